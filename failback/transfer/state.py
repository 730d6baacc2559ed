"""The engine's side of the state directory (its format is :mod:`.blockmap`'s): the recorded full
copy a later pass builds on, checkpoints saved from a background thread, and the digests and seals a
finished pass leaves."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator

from .blockmap import DiskState, Leaves, block_count, fingerprint, seal
from .nbd import NbdDisk
from .results import StateBusyError, TransferStateError

LOCK_FILE = "lock"


@contextlib.contextmanager
def locked(state_dir: str, *, exclusive: bool) -> Iterator[None]:
    """One pass at a time on a disk's state directory: a pass that writes (full copy, delta) holds it
    alone, passes that only read it (the verifications) may share it. The lock is an ``flock`` on
    ``lock`` in the directory, so the kernel drops it with the process: a killed worker leaves none
    behind. A second pass is refused at once, never queued behind the first: the caller (the portal's
    session lease) decides whether to wait. A directory that does not exist is not locked: the pass
    then finds no recorded copy and says so."""
    try:
        fd = os.open(os.path.join(state_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateBusyError(f"another pass is using {state_dir}: one pass at a time per disk") from None
        yield
    finally:
        os.close(fd)


def load_state(state_dir: str, size: int, block_size: int | None) -> DiskState:
    state = DiskState.load(state_dir)
    if state is None or not state.complete:
        raise TransferStateError(f"no completed full copy recorded in {state_dir}")
    if state.size != size:
        raise TransferStateError(f"source is {size} bytes, the recorded copy {state.size}")
    if block_size is not None and block_size != state.block_size:
        raise TransferStateError(f"block_size {block_size} differs from the recorded {state.block_size}")
    if not Leaves.exist(state_dir, block_count(size, state.grain)):
        raise TransferStateError(f"the leaf files in {state_dir} are missing or of another size")
    return state


def finish_state(state: DiskState, leaves: Leaves, sfd: int | NbdDisk, dfd: int | NbdDisk) -> None:
    """Both digests from the leaves, and fresh seals of both files (after the engine's last write) and
    of the leaf files the digests were computed from: while that seal holds, the recorded digests are
    those of the leaves as they are, and the switch's verification need not hash the leaves again."""
    state.digest = leaves.target.digest(state.size, state.grain)
    state.source_digest = leaves.source.digest(state.size, state.grain)
    state.leaves_seal = leaves.fingerprint()
    state.target_seal = seal(dfd, with_files=(leaves.source.fd, leaves.target.fd))  # one wait for all three
    state.source_seal = fingerprint(sfd)


class Checkpointer:
    """Saves the checkpoint every ``interval`` seconds from a background thread.

    When durable, the target and the leaves are flushed (fdatasync) before the checkpoint that claims
    them, so it survives a power loss too, not only a killed worker; the flush runs beside the copy.

    A checkpoint claims the position read when its save began, and it counts only once the save has
    ended, so a stop loses the work done since the last counted save began: up to the wait plus the
    next save's flush. The wait is therefore the interval less twice the last save's duration (at least a
    quarter of it; the first save begins at half the interval), which keeps that loss within one interval while a flush takes under 3/8 of it;
    waiting the whole interval after each save lost ``interval + flush`` (a 4 MiB block more than 2 s of
    copying at 8 MB/s when the flush took half a second).
    """

    def __init__(self, save: Callable[[], None], interval: float) -> None:
        self._save = save
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-checkpoint", daemon=True)

    def __enter__(self) -> Checkpointer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        wait = self._interval / 2  # the first save: its flush time is not known yet
        while not self._stop.wait(wait):
            began = time.monotonic()
            try:
                self._save()
            except Exception:  # e.g. no space for state.json: try again next time; the final save reports
                pass
            took = time.monotonic() - began
            wait = max(self._interval / 4, self._interval - 2 * took)
