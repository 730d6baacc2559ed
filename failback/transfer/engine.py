"""The disk transfer engine: phase 1 (full copy), phase 2 (delta), verification.

A pass walks the disk block by block (4 MiB by default) in the calling thread, which does the writing,
updates the leaf files (see :mod:`.blockmap`) in block order, reports progress and honours cancel and
the bandwidth limit. Reading and hashing (XXH3-128 per 64 KiB grain, 40 GB/s; all I/O releases the
GIL) run beside it on a small thread pool. A fixed number of block buffers circulate, so memory is
about ``(depth + workers) x block_size`` whatever the disk size.

Phase 1 copies each block's data ranges with copy_file_range (in the kernel, no copy through user
space), then a pool thread (or the calling thread, when it would otherwise wait) reads them back from
the target's page cache and computes the block's leaves:
the leaves record exactly the bytes that went into the target, even though phase 1 runs while the
replica is in use and a source block may change while it is copied. Grains found all zero are punched
out again. Blocks whose first data page is zeros are read into a buffer instead and only their
non-zero pages are written.

A delta (catch-up or the final one) reads only the grains it must look at — those the change
tracking names (rounded out to grains), or every grain holding data for the digest method — and
computes their leaves: on the pool for a block it reads whole or mostly, in the calling thread for a
block where few grains changed (its many small steps cost more in GIL hand-overs than they gain). A grain whose new leaf equals the target's leaf is done. For the others it
finds the 4 KiB pages to write: the source's non-zero pages when the target grain is known to be
zeros, else the pages that differ from a read of the target grain (so a coarse change tracking, or an
extent rewritten with the same bytes, costs reads, not writes). Zero pages are punched, never written,
and a zero page the target still allocates where the source has a hole (a guest's discard) is punched
too, so the target keeps the source's holes and is never more allocated than it. What was written is
read back at once and compared with what was read from the source; only then does the target's leaf
move (on a local file a block's punches run on a thread of their own, as they wait for the device,
and are all read back before the leaves are saved or the target sealed; over NBD, the switch's final
delta asks for the reads of the blocks in its window ahead and confirms and reads back its writes in
batches, so round trips overlap). Writes therefore follow the changed pages, reads follow the changed grains (tracked) or the
source's data (digest), and the switch needs no re-read of either disk: :func:`verify_changes` computes
both disk digests from the leaves.

One pass at a time per state directory: a full copy or a delta holds it alone, verifications share
it, and a second pass is refused at once with :class:`StateBusyError` (see :func:`.state.locked`).

Callbacks run in the calling thread, so a caller may use its own database connection there, and an
exception raised by a callback stops the pass and propagates (the checkpoint is kept). ``cancel`` is
any object with ``is_set()``; it is asked in the calling thread at least once per block.

This module is the public face: each call below takes its caller's options and runs the pass in
:mod:`.phase1` (full copy), :mod:`.delta` and :mod:`.examine` (catch-up and final delta) or :mod:`.verify` (digests and
checks). A pass's machinery is :mod:`.passes`, file helpers :mod:`.blockio`, the state directory
:mod:`.blockmap` and :mod:`.state`, the results and errors :mod:`.results`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import delta, phase1, verify
from .passes import CancelFlag, Controls, ProgressCallback
from .progress import Pacer, Progress
from .results import CopyResult, DiskProof, StateBusyError, TransferCancelled, TransferStateError, VerificationError
from .state import locked

__all__ = [
    "CopyResult",
    "DiskProof",
    "Progress",
    "StateBusyError",
    "TransferCancelled",
    "TransferStateError",
    "VerificationError",
    "delta_copy",
    "disk_digest",
    "full_copy",
    "target_untouched",
    "verify_changes",
    "verify_target",
]


def full_copy(
    src: str,
    dst: str,
    *,
    state_dir: str,
    block_size: int = 4 << 20,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.25,
    bandwidth_limit_bps: float | None = None,
    cancel: CancelFlag | None = None,
    durable: bool = True,
    checkpoint_interval: float = 2.0,
) -> CopyResult:
    """Phase 1: copy the allocated, non-zero data of src to dst and record both sides' leaves.

    dst may be missing (created) or an existing file (sized to src). With a valid checkpoint in
    state_dir — same source size, block size and target file — the copy resumes at the checkpoint; a
    complete one returns at once (a re-delivered task is a no-op). Otherwise the copy starts afresh,
    and whatever dst held is discarded (its data ranges are punched out).

    durable: flush target and leaves (fdatasync) before each checkpoint and at the end, so a checkpoint
    survives a power loss as well as a killed worker. checkpoint_interval: seconds between checkpoints.
    At the end the target is sealed (see :func:`target_untouched`).
    """
    # Each pass makes its pacer from this module's Pacer, so a test can put the limiter on its own clock.
    controls = Controls(progress, progress_interval, cancel, bandwidth_limit_bps, Pacer)
    os.makedirs(state_dir, exist_ok=True)  # the lock file lives in it; phase1.run fills it
    with locked(state_dir, exclusive=True):
        return phase1.run(
            src,
            dst,
            state_dir=state_dir,
            block_size=block_size,
            controls=controls,
            durable=durable,
            checkpoint_interval=checkpoint_interval,
        )


def delta_copy(
    src: str,
    dst: str,
    *,
    state_dir: str,
    changed_extents: Sequence[tuple[int, int]] | None,
    block_size: int | None = None,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.25,
    bandwidth_limit_bps: float | None = None,
    cancel: CancelFlag | None = None,
    durable: bool = True,
    source_quiet: bool = False,
) -> CopyResult:
    """Phase 2 / catch-up: bring dst from what the leaves record to src's current content.

    changed_extents (offset, length) given: method "tracked" — read only the grains (64 KiB) they
    touch, plus the blocks of an interrupted tracked pass. None: method "digest" — read all of src's
    data once and compare each grain's leaf. Either way only the 4 KiB pages that differ are written
    (zero pages are punched, never written, as are the target's zero pages where the source now has a
    hole), and what was written is read back and compared before the target's leaves move; grains
    already right cost no write.

    If the target changed since the engine's last pass (its seal is broken: someone wrote to the
    powered-off production disk), its data is re-read first and every grain that differs is repaired;
    CopyResult.target_untouched is then False. The leaves are updated block by block, so the call can
    be repeated, and a pass that died half-way is simply run again.
    block_size: None means the one recorded by full_copy.
    source_quiet: nothing writes to src during this pass (the switch's final delta: the replica is off).
    A tracked delta then compares only the named pages of a named grain both sides held alike, and
    trusts its other pages equal as change tracking says (without it, a guest write landing after the
    change id was taken could reach the source's leaf and not the target: the grain is compared whole).
    """
    controls = Controls(progress, progress_interval, cancel, bandwidth_limit_bps, Pacer)
    with locked(state_dir, exclusive=True):
        return delta.run(
            src,
            dst,
            state_dir=state_dir,
            changed_extents=changed_extents,
            block_size=block_size,
            controls=controls,
            durable=durable,
            source_quiet=source_quiet,
        )


def disk_digest(
    path: str,
    block_size: int = 4 << 20,
    *,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.25,
    cancel: CancelFlag | None = None,
) -> str:
    """The disk digest of a file, read in full (holes cost nothing): the same figure as
    CopyResult.digest and DiskProof, for anyone to check. It depends on the grain, not the block size."""
    return verify.digest(path, block_size, Controls(progress, progress_interval, cancel, None, Pacer))


def verify_target(
    dst: str,
    *,
    state_dir: str,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.25,
    cancel: CancelFlag | None = None,
) -> str:
    """Re-read all of dst's data and check every grain against the target leaves; return dst's digest.

    The full check, in proportion to the disk's data (not used by the switch: see verify_changes).
    Raises VerificationError naming the first grain (offset) whose content differs from the leaves.
    """
    controls = Controls(progress, progress_interval, cancel, None, Pacer)
    with locked(state_dir, exclusive=False):
        return verify.check_target(dst, state_dir=state_dir, controls=controls)


def target_untouched(dst: str, *, state_dir: str) -> bool:
    """Whether dst is as the engine's last pass left it (one fstat; no data read).

    False means someone wrote to (or truncated, or replaced) the production disk since: the next delta
    will re-read its data and repair it, and the portal should say so. See verify_changes for what
    the seal can and cannot see."""
    return verify.sealed_target(dst, state_dir=state_dir)


def verify_changes(
    src: str,
    dst: str,
    *,
    state_dir: str,
    samples: int = 16,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.25,
    cancel: CancelFlag | None = None,
) -> DiskProof:
    """The switch's verification, right after the final delta: both disk digests, from the leaves.

    What is proven when ``identical`` (source_digest == target_digest): every 64 KiB grain of the
    target equals the same grain of the source, because
    - each source leaf was computed from the source's bytes when the engine last read that grain (in
      phase 1, or by a delta that read it because change tracking named it or, digest method, because
      it read all data), and the source has not changed since except where the next delta read again:
      change tracking says so (tracked), the final delta read everything (digest), and the source's
      seal (size, allocation, mtime, ctime) still matches the one the final delta took;
    - each target leaf was computed from the target's bytes as read back (phase 1 read back every copied
      block; a delta reads back every page it writes, and a grain it did not fully read keeps a leaf the
      target was shown to hold before), and the target has not changed since: its seal still matches.
      A tracked delta takes a named grain that both sides held alike (equal leaves) to differ only in
      the pages change tracking names: it writes those and reads them back, and gives the grain the
      source's new leaf without comparing its other pages, on the same trust in change tracking as the
      grains it did not name;
    - and ``samples`` random data grains of each side are re-read now and must match their leaves
      (a cheap check that the leaves and the seals are not lying; 2 x samples x 64 KiB of reads). A
      file's are drawn among its allocated data (SEEK_DATA); an NBD export's among the grains its
      leaves say hold data (block status is a round trip each), and read in one round trip.

    What would break the proof, and what happens then:
    - a write to the production disk between passes (someone powered it on, or wrote to the file):
      its seal breaks; the next delta re-reads its data and repairs it (CopyResult.target_untouched is
      False), and if the seal breaks after the final delta, this function re-reads the target in full
      (target_sealed False) and reports what it really holds. Caveats: a write that restores size and
      both timestamps (needs the clock set back, or root), or corruption below the filesystem (media,
      a storage array), keeps the seal: only the samples (or verify_target, a full re-read) see it.
      The seal is a fingerprint of the file, so a hypervisor that writes disks in place through another
      path (vSphere's own I/O to a VMDK) must be checked with its own change tracking of the production
      disk instead;
    - change tracking that misses a write of the replica (the hypervisor's bug): the tracked method
      cannot see it; use the digest method where tracking is not trusted;
    - a write to the replica after the final delta: its seal breaks and the source is re-read in full
      (source_sealed False).

    Cost: 2 x samples grains, the digests the final delta computed from the leaves (taken as they are
    while both leaf files keep the seal that pass took of them; else the two leaf files are hashed
    again, 1/4096 of the disk's size each), plus a full re-read of a side only when its seal is
    broken. Raises VerificationError when a sample does not match its leaf.
    """
    controls = Controls(progress, progress_interval, cancel, None, Pacer)
    with locked(state_dir, exclusive=False):
        return verify.prove(src, dst, state_dir=state_dir, samples=samples, controls=controls)
