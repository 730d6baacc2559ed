"""Read-only passes and checks: a file's disk digest, the full re-read of a target against its leaves,
the seal check, and the switch's verification from the leaves and seals (public entries in
:mod:`.engine`)."""

from __future__ import annotations

import contextlib
import os
import random
import time
from typing import NamedTuple

from .blockio import Disk, check_block_size, data_blocks, fadvise, next_data, opened, pread, size_of
from .blockmap import (
    LEAF,
    ZERO_LEAF,
    DiskState,
    LeafFile,
    Leaves,
    TreeDigest,
    block_count,
    block_length,
    fingerprint,
    leaves_of,
)
from .nbd import NbdDisk
from .passes import HASH_WORKERS, CancelFlag, Controls, Hashed, Job, Pass, Work, verify_jobs
from .results import DiskProof, TransferCancelled, TransferStateError, VerificationError
from .sparse import allocated_bytes
from .state import load_state


def digest(path: str, block_size: int, controls: Controls) -> str:
    """The disk digest of a file, from a read of all its data."""
    check_block_size(block_size)
    bs = block_size
    with opened(path, os.O_RDONLY) as fd:
        size = size_of(fd)
        p = Pass(block_size=bs, controls=controls, src_fd=fd)
        tree = TreeDigest(size, p.grain)
        p.reporter.total = allocated_bytes(fd, 0, size)
        fadvise(fd, os.POSIX_FADV_SEQUENTIAL)

        def first(job: Job, buf: bytearray) -> Work:
            return lambda: p.hash_file(fd, job, buf)

        def finish(job: Job, buf: bytearray, h: Hashed) -> None:
            tree.add(job.offset // p.grain, h.leaves)
            p.reporter.done += job.work

        jobs = (
            Job(i, i * bs, block_length(i, size, bs), sum(b - a for a, b in segs))
            for i, segs in data_blocks(fd, 0, size, bs)
        )
        p.run(jobs, first, finish, HASH_WORKERS)
    p.reporter.final()
    return tree.hexdigest()


def check_target(dst: str, *, state_dir: str, controls: Controls) -> str:
    """Re-read all of dst's data against the target leaves; dst's digest."""
    with opened(dst, os.O_RDONLY) as fd:
        size = size_of(fd)
        state = load_state(state_dir, size, None)
        bs, g_size = state.block_size, state.grain
        p = Pass(block_size=bs, controls=controls, src_fd=fd)
        tree = TreeDigest(size, g_size)
        fadvise(fd, os.POSIX_FADV_SEQUENTIAL)
        with Leaves(state_dir, block_count(size, g_size), fresh=False) as leaves:
            p.reporter.total = sum(block_length(i, size, bs) for i, _ in data_blocks(fd, 0, size, bs))

            def first(job: Job, buf: bytearray) -> Work:
                return lambda: p.hash_file(fd, job, buf)

            def finish(job: Job, buf: bytearray, h: Hashed) -> None:
                if h.leaves != job.old_target:
                    raise _mismatch(dst, job, h.leaves, g_size)
                tree.add(job.offset // g_size, h.leaves)
                p.reporter.done += job.work

            p.run(verify_jobs(fd, leaves, size, bs, g_size), first, finish, HASH_WORKERS)
    p.reporter.final()
    return tree.hexdigest()


def _mismatch(dst: str, job: Job, leaves: bytes, g_size: int) -> VerificationError:
    """The error naming the first grain of the block whose leaf differs from the recorded one."""
    k = next(k for k in range(0, len(leaves), LEAF) if leaves[k : k + LEAF] != job.old_target[k : k + LEAF])
    offset = job.offset + k // LEAF * g_size
    expected = job.old_target[k : k + LEAF]
    what = "holds data where the leaves say zeros" if expected == ZERO_LEAF else "content differs"
    return VerificationError(
        f"{dst}: grain at offset {offset} ({g_size} bytes) does not match its leaf: {what}", offset
    )


def sealed_target(dst: str, *, state_dir: str) -> bool:
    """Whether dst's seal still matches the one the last pass took."""
    state = DiskState.load(state_dir)
    if state is None or state.target_seal is None:
        return False
    try:
        with opened(dst, os.O_RDONLY) as fd:
            return state.same_target(fd) and fingerprint(fd) == state.target_seal
    except OSError:
        return False


class _Side(NamedTuple):
    name: str
    fd: Disk
    leaves: LeafFile
    sealed: bool
    recorded: str | None  # the digest the last pass computed from these very leaves (leaves seal holds)


def prove(src: str, dst: str, *, state_dir: str, samples: int, controls: Controls) -> DiskProof:
    """Both disk digests from the leaves (a side whose seal broke is re-read), then sampled grains."""
    started = time.monotonic()
    with opened(src, os.O_RDONLY) as sfd, opened(dst, os.O_RDONLY) as dfd:
        size = size_of(sfd)
        state = load_state(state_dir, size, None)
        if not state.same_target(dfd):
            raise TransferStateError(f"{dst} is not the file the full copy wrote")
        target_sealed = state.target_seal is not None and fingerprint(dfd) == state.target_seal
        source_sealed = state.source_seal is not None and fingerprint(sfd) == state.source_seal
        with Leaves(state_dir, block_count(size, state.grain), fresh=False) as leaves:
            recorded = state.leaves_seal is not None and leaves.fingerprint() == state.leaves_seal
            source = _Side(src, sfd, leaves.source, source_sealed, state.source_digest if recorded else None)
            target = _Side(dst, dfd, leaves.target, target_sealed, state.digest if recorded else None)
            source_digest, source_read = _side_digest(source, state, controls)
            target_digest, target_read = _side_digest(target, state, controls)
            sample_read, checked = _check_samples((source, target), state, samples, controls.cancel)
    return DiskProof(
        source_digest,
        target_digest,
        source_digest == target_digest,
        source_sealed,
        target_sealed,
        source_read + target_read + sample_read,
        checked,
        time.monotonic() - started,
    )


def _side_digest(side: _Side, state: DiskState, controls: Controls) -> tuple[str, int]:
    """(digest, bytes read): from the leaves when the side is sealed (the one the last pass computed
    from them while their own seal holds: 0.27 ms a side on 16 GiB saved), else from a full read of it."""
    if side.sealed:
        return side.recorded or side.leaves.digest(state.size, state.grain, keep_nodes=False), 0
    figure = digest(side.name, state.block_size, controls)
    return figure, allocated_bytes(side.fd, 0, state.size)


def _check_samples(
    sides: tuple[_Side, ...], state: DiskState, samples: int, cancel: CancelFlag | None
) -> tuple[int, int]:
    """Re-read ``samples`` random data grains of each sealed side against their leaves: (bytes read,
    grains checked). Raises VerificationError at the first that does not match.

    A file's grains are drawn among its data (a random offset, then SEEK_DATA) and read one by one. An
    NBD export's are drawn among the grains its leaves say hold data (a random grain, then the next
    non-zero leaf: block status is a round trip, 0.4 ms here, and was most of the switch's
    verification over NBD) and read all at once."""
    size, g_size = state.size, state.grain
    rng = random.SystemRandom()
    bytes_read = checked = 0
    for side in sides:
        if not side.sealed or size == 0:
            continue
        if cancel is not None and cancel.is_set():
            raise TransferCancelled("transfer cancelled")
        if isinstance(side.fd, NbdDisk):
            grains = [_leaf_sample(side.leaves, rng) for _ in range(samples)]
            ranges = [(g * g_size, min(g_size, size - g * g_size)) for g in grains]
            datas = side.fd.pread_many(ranges)
        else:
            grains, datas = [], []
            for _ in range(samples):
                if cancel is not None and cancel.is_set():
                    raise TransferCancelled("transfer cancelled")
                g = _sample_grain(side.fd, size, g_size, rng)
                grains.append(g)
                datas.append(bytearray(pread(side.fd, min(g_size, size - g * g_size), g * g_size)))
        for g, data in zip(grains, datas, strict=True):
            bytes_read += len(data)
            checked += 1
            if leaves_of(data, 0, len(data), g_size) != side.leaves.get(g, 1):
                a = g * g_size
                raise VerificationError(f"{side.name}: grain at offset {a} does not match its leaf (sampled)", a)
    return bytes_read, checked


def _sample_grain(fd: Disk, size: int, g_size: int, rng: random.SystemRandom) -> int:
    """A random grain, drawn among the file's data when it has some (a random offset, then SEEK_DATA)."""
    offset = rng.randrange(size)
    try:
        offset = next_data(fd, offset)
    except OSError:
        with contextlib.suppress(OSError):
            offset = next_data(fd, 0)
    return min(offset, size - 1) // g_size


def _leaf_sample(leaves: LeafFile, rng: random.SystemRandom, chunk: int = 4096) -> int:
    """A random grain, drawn among those whose leaf says data when there are any (a random grain, then
    the next non-zero leaf, going round once)."""
    n = leaves.n_grains
    start = rng.randrange(n)
    for first in (*range(start, n, chunk), *range(0, start, chunk)):
        count = min(chunk, n - first)
        got = leaves.get(first, count)
        zeros = len(got) - len(got.lstrip(b"\0"))  # the first non-zero byte is in the first non-zero leaf
        if zeros < len(got):
            return first + zeros // LEAF
    return start
