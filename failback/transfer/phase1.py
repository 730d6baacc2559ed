"""Phase 1, the full copy (public entry: :func:`.engine.full_copy`).

Each block's data ranges are copied by copy_file_range, each source extent allocated whole in the
target first; the pool reads them back from the target's page cache and hashes them, so the leaves are
of exactly the bytes that went in. A block whose first data page is zeros (and that is not inside an
extent allocated ahead) is read into a buffer instead and only its non-zero pages are written. The pass resumes from the checkpoint a background thread saves every few
seconds. Why this shape, with figures: docs/decisions.md, "Transfer engine: phase 1 against cp".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator

from .blockio import Disk, check_block_size, data_blocks, fadvise, flush, opened, resize, size_of, zero_page_runs
from .blockmap import LEAF, ZERO_LEAF, DiskState, Leaves, block_count, block_length, grain_for, save_state
from .nbd import NbdDisk
from .passes import COPY_WORKERS, Controls, Hashed, Job, Pass, Work
from .progress import Reporter
from .results import CopyResult
from .sparse import allocate, allocated_bytes, data_extents, punch_hole, zero_range
from .state import Checkpointer, finish_state


def run(
    src: str,
    dst: str,
    *,
    state_dir: str,
    block_size: int,
    controls: Controls,
    durable: bool,
    checkpoint_interval: float,
) -> CopyResult:
    started = time.monotonic()
    check_block_size(block_size)
    bs = block_size
    with opened(src, os.O_RDONLY) as sfd, opened(dst, os.O_RDWR | os.O_CREAT) as dfd:
        size = size_of(sfd)
        n_grains = block_count(size, grain_for(bs))
        state, resume, position = _checkpoint_or_fresh(state_dir, size, bs, dfd, n_grains)
        if resume and state.complete and state.digest:
            Reporter(0, controls.progress, controls.progress_interval).final()
            elapsed = time.monotonic() - started
            return CopyResult("full", 0, 0, 0, 0, elapsed, state.digest, size, state.source_digest or "")

        # Whatever lies in dst past the checkpoint was written after it (or by someone else): clear it,
        # so that the blocks skipped as holes or zeros do read as zeros. One punch also frees ranges
        # allocated but never written (they read as zeros but are not data to lseek).
        if not punch_hole(dfd, position, size - position):
            for a, b in list(data_extents(dfd, position, size)):
                zero_range(dfd, a, b - a)
        with Leaves(state_dir, n_grains, fresh=not resume) as leaves:
            if resume:
                leaves.clear_from(position // grain_for(bs))
            else:
                save_state(state_dir, state, durable=durable)
            p = Pass(block_size=bs, controls=controls, src_fd=sfd, dst_fd=dfd)
            p.position = position
            p.reporter.total = allocated_bytes(sfd, position, size)
            fadvise(sfd, os.POSIX_FADV_SEQUENTIAL)
            copy = _FullCopy(p, leaves, state, state_dir, durable)
            copy.run(_jobs(sfd, position, size, bs), checkpoint_interval)
            copy.complete()
    p.reporter.final()
    return copy.result(started, position)


def _checkpoint_or_fresh(state_dir: str, size: int, bs: int, dfd: Disk, n_grains: int) -> tuple[DiskState, bool, int]:
    """(state, resume, position): the checkpoint to resume from when it fits this source, block size
    and target file, else a fresh state and the target sized to the source."""
    state = DiskState.load(state_dir)
    if (
        state is not None
        and state.size == size
        and state.block_size == bs
        and state.position % bs == 0
        and state.same_target(dfd)
        and size_of(dfd) == size
        and Leaves.exist(state_dir, n_grains)
    ):
        return state, True, size if state.complete else state.position
    if size_of(dfd) != size:
        resize(dfd, size)
    return DiskState.new(size, bs, dfd), False, 0


def _jobs(sfd: Disk, position: int, size: int, bs: int) -> Iterator[Job]:
    """A job for each block from position on that holds data, with its data ranges."""
    return (
        Job(i, i * bs, block_length(i, size, bs), sum(b - a for a, b in segs), segs)
        for i, segs in data_blocks(sfd, position, size, bs)
    )


def _empty_copied_grains(leaves: bytes, segments: tuple[tuple[int, int], ...], g_size: int) -> Iterator[int]:
    """The grains of a copied block that its data ranges (sorted) touch and whose leaf is the zero
    leaf, in order. Searched per range in C (``bytes.find``), not grain by grain in Python: the grains
    outside the ranges (holes: zero leaves, nothing copied) were most of this check's cost on the
    calling thread, whose copy is phase 1's critical path."""
    last = -1
    for x, y in segments:
        stop = -(-y // g_size) * LEAF
        at = leaves.find(ZERO_LEAF, x // g_size * LEAF, stop)
        while at >= 0:
            if at % LEAF:  # zeros across two leaves: look on from the next byte
                at = leaves.find(ZERO_LEAF, at + 1, stop)
                continue
            if at // LEAF > last:
                last = at // LEAF
                yield last
            at = leaves.find(ZERO_LEAF, at + LEAF, stop)


HELD_LEAVES = 256 << 10  # bytes of leaves held before they are written (1 GiB of disk)
HELD_SECONDS = 0.1


class _FullCopy:
    """The per-block steps and the checkpoints of one phase-1 pass."""

    def __init__(self, p: Pass, leaves: Leaves, state: DiskState, state_dir: str, durable: bool) -> None:
        self.p = p
        self.leaves = leaves
        self.state = state
        self.state_dir = state_dir
        self.durable = durable
        # Leaves of finished blocks not written yet: one pwrite per side for many blocks, not per block
        # (each was a GIL round trip behind the hashing thread: 10 % of the sparse shape's phase 1).
        self.held = bytearray()
        self.held_from = 0  # first grain of self.held
        self.held_to = 0  # end offset of the last block in self.held
        self.held_since = time.monotonic()
        self.last_hold = float("-inf")
        # Allocation ahead of the copy (see copy), not under a bandwidth limit (the copy's speed does not
        # matter there, and space is taken as it is written): the target is allocated up to
        # allocated_to, and written by the copy up to copied_to within that allocation.
        self.allocated_to = 0
        self.copied_to = 0
        self.allocating = p.copy_range_ok and not p.pacer.active and isinstance(p.dst_fd, int)

    def run(self, jobs: Iterator[Job], checkpoint_interval: float) -> None:
        try:
            with Checkpointer(self.checkpoint, checkpoint_interval):
                self.p.run(jobs, self.first, self.finish, COPY_WORKERS)
                self.put_leaves()
        except BaseException:
            with contextlib.suppress(Exception):
                self.put_leaves()
                self.checkpoint()
            raise

    def hold_leaves(self, first_grain: int, leaves: bytes, end: int) -> None:
        """Keep a finished block's leaves (holes between blocks held as zero leaves, which they are);
        written, and the position moved past them, every 256 KiB of leaves or 0.1 s, so a checkpoint
        never claims a block whose leaves are not in the files and loses at most 0.1 s more of copying.
        Blocks that come more than 0.1 s apart (a bandwidth limit, a slow export) are written at once."""
        now = time.monotonic()
        slow, self.last_hold = now - self.last_hold >= HELD_SECONDS, now
        gap = first_grain - self.held_from - len(self.held) // LEAF
        if not self.held or gap < 0 or gap > HELD_LEAVES // LEAF:
            self.put_leaves()
            self.held_from, gap = first_grain, 0
        self.held += bytes(gap * LEAF)
        self.held += leaves
        self.held_to = end
        if slow or len(self.held) >= HELD_LEAVES or now - self.held_since >= HELD_SECONDS:
            self.put_leaves()

    def put_leaves(self) -> None:
        """Write the held leaves to both sides, then move the position past their blocks."""
        if self.held:
            self.leaves.source.put(self.held_from, bytes(self.held))
            self.leaves.target.put(self.held_from, bytes(self.held))
            self.held = bytearray()
            self.p.position = self.held_to
        self.held_since = time.monotonic()

    def first(self, job: Job, buf: bytearray) -> Hashed | Work:
        """Copy the block in the kernel (the pool hashes it back from the target's page cache), or,
        when its first data page is zeros, read it into buf and write only its non-zero pages. A block
        inside a range allocated ahead is copied whatever its first page (see copy)."""
        p = self.p
        if (
            p.copy_range_ok
            and (job.offset + job.segments[0][0] < self.allocated_to or p.probe_has_data(job))
            and all(self.copy(job.offset + a, b - a) for a, b in job.segments)
        ):
            p.bytes_read += job.work
            return lambda: p.hash_copied(job, buf)
        if isinstance(p.src_fd, NbdDisk):  # reads over NBD: on the pool, each thread its own connection
            return lambda: self.read_and_plan(job, buf)
        spans = p.fill(p.src_fd, job, buf)
        p.bytes_read += job.work
        written = False
        for a, b in job.segments:
            for x, y, zero in zero_page_runs(buf, a, b):
                if zero:
                    p.zero_skipped += y - x
                else:
                    p.write_new(buf, job.offset, x, y)
                    written = True
        if not written:
            return Hashed(bytes(LEAF * block_count(job.length, p.grain)))
        return lambda: p.hash_spans(job, buf, spans)

    def copy(self, offset: int, length: int) -> bool:
        """copy_file_range one data range, the source extent it starts allocated first in the target,
        whole: ext4 then skips its page-by-page reservation of delayed allocation, 10-15 % of phase 1
        (docs/decisions.md, issue 13). Whole extents, in one call each, so the target is in no more
        extents than the source (allocated block by block, the pieces landed apart, and the extra
        extents cost an extent-tree block the source did not have). What was allocated and then not
        copied (the source gave it back since) is punched before the copy moves past it."""
        p = self.p
        self.give_back(offset)
        if self.allocating and offset >= self.allocated_to:
            try:
                end = min(os.lseek(p.src_fd, offset, os.SEEK_HOLE), self.state.size)
            except OSError:
                end = offset + length
            if allocate(p.dst_fd, offset, end - offset):
                self.allocated_to, self.copied_to = end, offset
        if not p.copy_range(offset, length):
            self.give_back(self.allocated_to)
            self.allocating = False
            return False
        self.copied_to = max(self.copied_to, offset + length)
        return True

    def give_back(self, offset: int) -> None:
        """Punch what was allocated ahead below offset and not copied."""
        end = min(offset, self.allocated_to)
        if self.copied_to < end:
            zero_range(self.p.dst_fd, self.copied_to, end - self.copied_to)
            self.copied_to = end

    def read_and_plan(self, job: Job, buf: bytearray) -> Hashed:
        """On the pool (a source over NBD): read the block's data ranges, find its non-zero page runs
        for :meth:`finish` to write, and hash them; a round trip per request, so several in flight."""
        p = self.p
        spans = p.fill(p.src_fd, job, buf)
        writes: list[tuple[int, int]] = []
        skipped = 0
        for a, b in job.segments:
            for x, y, zero in zero_page_runs(buf, a, b):
                if zero:
                    skipped += y - x
                else:
                    writes.append((x, y))
        h = p.hash_spans(job, buf, spans) if writes else Hashed(bytes(LEAF * block_count(job.length, p.grain)))
        h.writes, h.zero_grains, h.target_read = writes, skipped, job.work
        return h

    def finish(self, job: Job, buf: bytearray, h: Hashed) -> None:
        """Write what the pool read (NBD source), punch out copied grains found all zero, then record
        the block's leaves on both sides."""
        p, g_size = self.p, self.p.grain
        if h.target_read:  # read on the pool: the calling thread writes, in block order
            p.bytes_read += h.target_read
            p.zero_skipped += h.zero_grains
            p.write_runs(buf, job.offset, h.writes)
        if h.copied and ZERO_LEAF in h.leaves:
            for k in _empty_copied_grains(h.leaves, job.segments, g_size):  # copied, then found empty
                a, b = k * g_size, min((k + 1) * g_size, job.length)
                p.zero_skipped += sum(min(y, b) - max(x, a) for x, y in job.segments if x < b and y > a)
                zero_range(p.dst_fd, job.offset + a, b - a)  # make the grain a hole again
        p.reporter.done += job.work
        self.hold_leaves(job.offset // g_size, h.leaves, job.offset + job.length)

    def checkpoint(self) -> None:
        pos = self.p.position
        if self.durable:
            flush(self.p.dst_fd)
            self.leaves.sync()
        save_state(self.state_dir, dataclasses.replace(self.state, position=pos), durable=self.durable)

    def complete(self) -> None:
        """The copy is whole: flush, then record it complete with both digests and fresh seals."""
        state = self.state
        self.give_back(state.size)
        if self.durable:
            flush(self.p.dst_fd)
            self.leaves.sync()
        state.position, state.complete, state.pending = state.size, True, []
        finish_state(state, self.leaves, self.p.src_fd, self.p.dst_fd)
        save_state(self.state_dir, state, durable=self.durable)

    def result(self, started: float, resumed_from: int) -> CopyResult:
        p, state = self.p, self.state
        assert state.digest is not None
        return CopyResult(
            "full",
            p.reporter.total,
            p.bytes_read,
            p.bytes_written,
            p.zero_skipped,
            time.monotonic() - started,
            state.digest,
            resumed_from,
            state.source_digest or "",
        )
