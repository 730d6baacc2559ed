"""Phase 2 and catch-up, the delta (public entry: :func:`.engine.delta_copy`).

The grains a delta must look at are read and planned, per grain, into the pages to write (see
:mod:`.examine`: on the pool for a block read whole or mostly, else in the calling thread); the
calling thread writes them, reads them back, and only then moves the target's leaves. A target changed behind
the engine's back is re-read first and repaired. With the source quiet (the switch's final delta), a
tracked delta compares a named grain both sides held alike at its named pages only: nothing else in it
can differ.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter

from .blockio import (
    PAGE,
    Disk,
    data_blocks,
    fadvise,
    flush,
    next_data,
    opened,
    pread,
    size_of,
)
from .blockmap import (
    LEAF,
    DiskState,
    Leaves,
    block_count,
    block_length,
    fingerprint,
    leaves_of,
    save_state,
)
from .examine import Reads, examine
from .nbd import Flight, NbdDisk
from .passes import HASH_WORKERS, Controls, Hashed, Job, Later, Pass, Work, block_leaves, verify_jobs
from .results import CopyResult, TransferStateError, VerificationError
from .sparse import is_zero, zero_range
from .state import finish_state, load_state

PUNCH_BACKLOG = 64  # blocks whose punches may wait on the punch thread
WRITE_BATCH = 64  # over NBD: blocks whose writes are confirmed and read back together
WRITE_BATCH_BYTES = 16 << 20  # ... or bytes written and zeroed


def run(
    src: str,
    dst: str,
    *,
    state_dir: str,
    changed_extents: Sequence[tuple[int, int]] | None,
    block_size: int | None,
    controls: Controls,
    durable: bool,
    source_quiet: bool = False,
) -> CopyResult:
    started = time.monotonic()
    with opened(src, os.O_RDONLY) as sfd, opened(dst, os.O_RDWR) as dfd:
        size = size_of(sfd)
        state = load_state(state_dir, size, block_size)
        if not state.same_target(dfd):
            raise TransferStateError(f"{dst} is not the file the full copy wrote")
        untouched = state.target_seal is not None and state.target_seal == fingerprint(dfd)
        p = Pass(block_size=state.block_size, controls=controls, src_fd=sfd, dst_fd=dfd)
        # A delta reads the target where grains differ and reads back what it wrote, scattered: no
        # read-ahead, which zero-filled page-cache pages around every read of a hole. The source keeps
        # its read-ahead on a live replica (uncached, the grains of a catch-up pass are often near each
        # other), but not in the switch's final delta (source_quiet, tracked): it reads the named grains
        # (of one that read all zeros at the last pass, its named pages only), adjacent ones merged into
        # one read, and nothing else, and read-ahead there zero-filled pages of the replica's holes
        # beside each named grain (12 % of the window's CPU on a 16 GiB disk).
        fadvise(dfd, os.POSIX_FADV_RANDOM)
        if source_quiet and changed_extents is not None:
            fadvise(sfd, os.POSIX_FADV_RANDOM)
        with Leaves(state_dir, block_count(size, state.grain), fresh=False) as leaves:
            leaves.trust_nodes(state)  # before anything moves them (unseal, repair, the delta)
            delta = _Delta(p, leaves, state, state_dir, dst, durable)
            if not untouched:
                delta.repair_target()
            jobs: Iterable[Job]
            if changed_extents is not None:
                method, jobs = "tracked", delta.tracked_jobs(changed_extents, named_only=source_quiet)
            else:
                method, jobs = "digest", delta.digest_jobs()
            delta.run(jobs)
    p.reporter.final()
    assert state.digest is not None
    return CopyResult(
        method,
        p.reporter.total,
        p.bytes_read,
        p.bytes_written,
        p.zero_skipped,
        time.monotonic() - started,
        state.digest,
        0,
        state.source_digest or "",
        p.target_read,
        untouched,
    )


class _Delta:
    """The steps of one delta pass, in the calling thread: choosing the jobs, then per block writing
    the planned pages, reading them back and moving the leaves."""

    def __init__(self, p: Pass, leaves: Leaves, state: DiskState, state_dir: str, dst: str, durable: bool) -> None:
        self.p = p
        self.leaves = leaves
        self.state = state
        self.state_dir = state_dir
        self.dst = dst
        self.durable = durable
        self.size, self.bs, self.g_size = state.size, state.block_size, state.grain
        self.per = self.bs // self.g_size
        self.remote_dst = isinstance(p.dst_fd, NbdDisk)
        self.remote = isinstance(p.src_fd, NbdDisk) or self.remote_dst
        self._sent: list[tuple[Job, list[tuple[int, bytes]], list[tuple[int, int]], Flight]] = []
        self._sent_bytes = 0
        self.applying = False  # between a block's first write and its leaves: the leaves may be stale
        self._puncher: ThreadPoolExecutor | None = None
        self._punching: deque[tuple[Job, Future[tuple[int, int, list[tuple[int, int]]]]]] = deque()
        p.before_write = self.unseal

    def _save(self) -> None:
        save_state(self.state_dir, self.state, durable=self.durable)

    def unseal(self) -> None:
        """Before the first write: a pass that dies leaves the target (and its leaves) unsealed."""
        if self.state.target_seal is not None or self.state.leaves_seal is not None:
            self.state.target_seal = self.state.leaves_seal = None
            self._save()
        self.p.before_write = lambda: None

    def repair_target(self) -> None:
        """The target changed since the last pass: re-read it into its leaves, and add the blocks now
        out of sync to the pending ones (read in full)."""
        self.unseal()
        repair = _reread_target(self.p, self.leaves, self.p.dst_fd, self.size, self.bs)
        self.state.pending = _merge_block_ranges([*self.state.pending, *([i, i + 1] for i in repair)])
        self._save()

    def tracked_jobs(self, changed_extents: Sequence[tuple[int, int]], *, named_only: bool) -> Iterator[Job]:
        """Method "tracked": the blocks the extents touch, and those pending, recorded before reading.
        named_only (the source is quiet): a named grain in sync is compared at its named pages only."""
        state = self.state
        by_block = _extents_by_grain(changed_extents, self.size, self.bs, self.g_size)
        leftover = {i for lo, hi in state.pending for i in range(lo, hi)}
        touched = [[i, i + 1] for i in by_block]
        state.pending = _merge_block_ranges([*touched, *state.pending])
        self._save()
        plan = _TrackedPlan(by_block, leftover, self.size, self.bs, self.g_size, named_only)
        self.p.reporter.total = sum(
            plan.grain_bytes(*plan.grains(i)) for lo, hi in state.pending for i in range(lo, hi)
        )
        return self._tracked(plan)

    def _tracked(self, plan: _TrackedPlan) -> Iterator[Job]:
        for lo, hi in self.state.pending:
            for i in range(lo, hi):
                n, grains = plan.grains(i)
                count = block_count(n, self.g_size)
                yield Job(
                    i,
                    i * self.bs,
                    n,
                    plan.grain_bytes(n, grains),
                    grains=grains,
                    old_source=self.leaves.source.get(i * self.per, count),
                    old_target=self.leaves.target.get(i * self.per, count),
                    changed=plan.changed(i),
                )

    def digest_jobs(self) -> Iterator[Job]:
        """Method "digest": every block holding data, or non-zero leaves on either side."""
        sfd = self.p.src_fd
        fadvise(sfd, os.POSIX_FADV_SEQUENTIAL)
        self.p.reporter.total = sum(
            block_length(i, self.size, self.bs) for i, _ in data_blocks(sfd, 0, self.size, self.bs)
        )
        return _compare_jobs(sfd, self.leaves, self.size, self.bs, self.g_size)

    def run(self, jobs: Iterable[Job]) -> None:
        try:
            try:
                self.p.run(jobs, self.first, self.finish, HASH_WORKERS)
            finally:  # all read back before the leaves are saved or the target sealed
                try:
                    self._settle_punches(0)
                finally:
                    self._confirm_writes()
        except BaseException:
            if not self.applying:  # stopped between grains: the leaves say what the target holds
                with contextlib.suppress(Exception):
                    self._close(keep_pending=True)
            raise
        self._close(keep_pending=False)

    def first(self, job: Job, buf: bytearray) -> Hashed | Work | Later:
        """A block read whole or mostly goes to the pool (large reads, GIL released); one where few
        grains changed is examined here: its work is many small steps, and handing each block to a
        pool thread and back cost more in GIL hand-overs than it saved (random shape, tracked:
        1.5 s with the pool against 0.9 s inline, with other work on both CPUs)."""
        if 2 * len(job.grains) < self.per:
            if self.remote:  # over NBD: the reads start now, the block is examined when its turn comes
                reads = Reads(self.p, job, buf)
                return Later(lambda: examine(self.p, job, buf, reads), lambda: reads.wait(quiet=True))
            return examine(self.p, job, buf)
        return lambda: examine(self.p, job, buf)

    def finish(self, job: Job, buf: bytearray, h: Hashed) -> None:
        """Apply the block's plans, then move both sides' leaves; a grain that did not read back as
        written gets the leaf of what the target holds, and the pass stops."""
        p, g_size = self.p, self.g_size
        p.bytes_read += h.source_read
        p.target_read += h.target_read
        source = bytearray(h.leaves or job.old_source)  # h.leaves: the whole block's, when it was in sync
        target = bytearray(job.old_target)
        for g, leaf in h.new.items():
            source[g * LEAF : (g + 1) * LEAF] = leaf
        self.applying = True
        bad = self._apply(job, buf, h) if h.plans or h.spare else ()
        for g in h.plans:
            if g in bad:  # record what the target really holds, then stop
                a, b = g * g_size, min((g + 1) * g_size, job.length)
                target[g * LEAF : (g + 1) * LEAF] = self._target_leaf(job, a, b)
            else:
                target[g * LEAF : (g + 1) * LEAF] = h.new[g]
        first_grain = job.index * self.per
        self.leaves.source.put(first_grain, bytes(source))
        self.leaves.target.put(first_grain, bytes(target))
        self.applying = False
        p.reporter.done += job.work
        if bad:
            offset = job.offset + min(bad) * g_size
            raise VerificationError(f"{self.dst}: the write at offset {offset} did not read back as written", offset)

    def _apply(self, job: Job, buf: bytearray, h: Hashed) -> set[int]:
        """Write the block's planned pages and punch its zero pages, grains punched whole and the spare
        pages, as the merged runs :func:`_io_runs` made of them on the pool, then read back what was
        written and punched: the grains that did not take."""
        p = self.p
        writes, zeros = h.writes, h.zeros
        p.zero_skipped += h.zero_grains
        if self.remote_dst and not p.pacer.active and (not zeros or p.dst_fd.can_zero):
            self._write_aside(job, buf, writes, zeros)
            return set()
        p.write_runs(buf, job.offset, writes)
        if zeros and isinstance(p.dst_fd, int) and not p.pacer.active:
            self._punch_aside(job, zeros)
            zeros = []
        for x, y in zeros:
            p.zero(job.offset + x, y - x)
        took = True
        dfd, base = p.dst_fd, job.offset
        read = os.pread if type(dfd) is int else pread
        for x, y in writes:
            p.target_read += y - x
            took = buf.startswith(read(dfd, y - x, base + x), x) and took
        for x, y in zeros:  # a hole reads as zeros: only a range the filesystem did not punch is read
            if not _is_hole(p.dst_fd, job.offset + x, job.offset + y):
                p.target_read += y - x
                took = is_zero(pread(p.dst_fd, y - x, job.offset + x)) and took
        if took:
            return set()
        return {g for g, plan in h.plans.items() if not self._took(job, buf, g, plan)}

    def _punch_aside(self, job: Job, zeros: list[tuple[int, int]]) -> None:
        """Punch a block's zero runs on the punch thread, which reads them back; the calling thread goes
        on. A punch waits for the device (0.2-0.4 ms each on this discard-mounted disk, 375 of them a
        quarter of a tracked delta of 10,000 scattered writes); ext4 serialises it with our writes to
        the file, not with our reads. At most PUNCH_BACKLOG blocks wait, so a cancel waits little."""
        if self._puncher is None:
            self._puncher = ThreadPoolExecutor(1, thread_name_prefix="transfer-punch")
        self.p.before_write()
        self._punching.append((job, self._puncher.submit(_punch_runs, self.p.dst_fd, job.offset, zeros)))
        self._settle_punches(PUNCH_BACKLOG)

    def _write_aside(
        self, job: Job, buf: bytearray, writes: list[tuple[int, int]], zeros: list[tuple[int, int]]
    ) -> None:
        """Over NBD: send the block's writes and zeroings and go on; they are confirmed and read back
        with those of the blocks after it, up to WRITE_BATCH blocks or bytes, all in flight at once (two
        round trips for the batch, not two per block). Each run is sent from a copy, which the read-back
        compares with: the block's buffer goes back to the pass meanwhile."""
        self.p.before_write()
        base = job.offset
        data = [(base + x, bytes(buf[x:y])) for x, y in writes]
        blank = [(base + x, y - x) for x, y in zeros]
        flight = self.p.dst_fd.start_writes(data, blank)
        self._sent.append((job, data, blank, flight))
        sent = sum(len(d) for _, d in data)
        self._sent_bytes += sent + sum(n for _, n in blank)
        self.p._wrote(sent)
        if len(self._sent) >= WRITE_BATCH or self._sent_bytes >= WRITE_BATCH_BYTES:
            self._confirm_writes()

    def _confirm_writes(self) -> None:
        """Wait for the writes sent, then read them all back at once: written runs must read as
        written, zeroed ones as zeros. A run that does not gives its grains the target's real leaves
        and stops the pass, as in direct mode; a request that failed leaves the leaves unsettled."""
        sent, self._sent, self._sent_bytes = self._sent, [], 0
        if not sent:
            return
        dfd = self.p.dst_fd
        try:
            for *_, flight in sent:
                flight.wait()
            ranges = [r for _, data, blank, _ in sent for r in [*((off, len(d)) for off, d in data), *blank]]
            got = iter(dfd.pread_many(ranges))  # in the order compared below: per block, data then zeros
        except BaseException:
            self.applying = True  # these blocks' leaves moved, their writes may not have landed
            raise
        bad: list[tuple[Job, int, int]] = []  # (job, offset, length) of each run that did not read back
        for job, data, blank, _ in sent:
            for off, d in data:
                self.p.target_read += len(d)
                if next(got) != d:
                    bad.append((job, off, len(d)))
            for off, n in blank:
                self.p.target_read += n
                if not is_zero(next(got)):
                    bad.append((job, off, n))
        for job, off, n in bad:
            self._real_leaves(job, [(off - job.offset, off - job.offset + n)])
        if bad:
            offset = min(off for _, off, _ in bad)
            raise VerificationError(f"{self.dst}: the write at offset {offset} did not read back as written", offset)

    def _settle_punches(self, keep: int) -> None:
        """Wait for the oldest blocks' punches until at most ``keep`` wait. A run that did not read back
        as zeros gets its grains' real leaves on the target side, and the pass stops (as a write that
        did not read back does); a punch that failed leaves the leaves unsettled (``applying``)."""
        try:
            while len(self._punching) > keep:
                self._settle_punch(*self._punching.popleft())
        except BaseException:
            if self._punching:  # blocks still waiting moved their leaves: leave the target unsealed
                self.applying = True
            for _, fut in self._punching:  # none may punch after the pass has returned
                with contextlib.suppress(BaseException):
                    fut.result()
            self._punching.clear()
            raise
        finally:
            if not self._punching and self._puncher is not None:
                self._puncher.shutdown(wait=False)
                self._puncher = None

    def _settle_punch(self, job: Job, fut: Future[tuple[int, int, list[tuple[int, int]]]]) -> None:
        """One block's punches: counted, and checked (see _settle_punches)."""
        try:
            written, read, failed = fut.result()
        except BaseException:
            self.applying = True  # this block's leaves moved, its punches may not have happened
            raise
        self.p.target_read += read
        if written:
            self.p._wrote(written)
        if failed:
            offset = self._real_leaves(job, failed)
            raise VerificationError(f"{self.dst}: the punch at offset {offset} did not read back as zeros", offset)

    def _real_leaves(self, job: Job, runs: list[tuple[int, int]]) -> int:
        """Give the grains of the runs (relative to the block) that did not read back as sent the leaves
        of what the target holds; the offset of the first."""
        g_size = self.g_size
        grains = sorted({g for x, y in runs for g in range(x // g_size, (y - 1) // g_size + 1)})
        for g in grains:
            a, b = g * g_size, min((g + 1) * g_size, job.length)
            self.leaves.target.put(job.index * self.per + g, self._target_leaf(job, a, b))
        return job.offset + grains[0] * g_size

    def _took(self, job: Job, buf: bytearray, g: int, plan: list[tuple[int, int]] | None) -> bool:
        """Whether one grain reads back as planned (after a block's read-back found a difference)."""
        dfd, g_size = self.p.dst_fd, self.g_size
        if plan is None:
            a, b = g * g_size, min((g + 1) * g_size, job.length)
            return is_zero(pread(dfd, b - a, job.offset + a))
        return all(pread(dfd, y - x, job.offset + x) == buf[x:y] for x, y in plan)

    def _target_leaf(self, job: Job, a: int, b: int) -> bytes:
        t = self.p.scratch(b - a)
        self.p.read(self.p.dst_fd, t, 0, b - a, job.offset + a)
        return leaves_of(t, 0, b - a, self.g_size)

    def _close(self, *, keep_pending: bool) -> None:
        if self.durable:
            flush(self.p.dst_fd)
            self.leaves.sync()
        if not keep_pending:
            self.state.pending = []
        finish_state(self.state, self.leaves, self.p.src_fd, self.p.dst_fd)
        self._save()


@dataclass(frozen=True)
class _TrackedPlan:
    """Which grains of a block a tracked delta reads: those the changed extents touch, or all of a
    block left pending (by an interrupted pass or the target's repair) or not named by the extents."""

    by_block: dict[int, dict[int, list[tuple[int, int]]]]  # see _extents_by_grain
    leftover: set[int]
    size: int
    bs: int
    g_size: int
    named_only: bool

    def grains(self, i: int) -> tuple[int, tuple[int, ...]]:
        """(block length, grains to read) of block i."""
        n = block_length(i, self.size, self.bs)
        if i in self.leftover or i not in self.by_block:
            return n, tuple(range(block_count(n, self.g_size)))
        return n, tuple(self.by_block[i])

    def changed(self, i: int) -> dict[int, list[tuple[int, int]]] | None:
        """The pages of block i change tracking names (rounded out to pages, cut at grains), by grain;
        None when the whole block is to be compared."""
        if not self.named_only or i in self.leftover:
            return None
        return self.by_block.get(i)

    def grain_bytes(self, n: int, grains: tuple[int, ...]) -> int:
        if not grains:
            return 0
        return len(grains) * self.g_size - max(0, (grains[-1] + 1) * self.g_size - n)


# --------------------------------------------------------------------------------------------------
# Choosing the blocks


def _compare_jobs(fd: Disk, leaves: Leaves, size: int, bs: int, g_size: int) -> Iterator[Job]:
    """Digest method: a job for every block that holds data in fd or non-zero leaves on either side."""
    data = data_blocks(fd, 0, size, bs)
    next_data = next(data, None)
    for index, s, t in block_leaves(leaves, size, bs, g_size):
        has_data = next_data is not None and next_data[0] == index
        if has_data:
            next_data = next(data, None)
        if has_data or s.count(0) != len(s) or t.count(0) != len(t):
            n = block_length(index, size, bs)
            yield Job(
                index,
                index * bs,
                n,
                n if has_data else 0,
                grains=tuple(range(block_count(n, g_size))),
                old_source=s,
                old_target=t,
                read=has_data,
            )


def _reread_target(p: Pass, leaves: Leaves, dfd: Disk, size: int, bs: int) -> list[int]:
    """Re-read the target's data and put its real leaves in the map; the blocks now out of sync."""
    g_size = p.grain
    per = bs // g_size
    repair: list[int] = []
    jobs = verify_jobs(dfd, leaves, size, bs, g_size)

    def first(job: Job, buf: bytearray) -> Work:
        return lambda: p.hash_file(dfd, job, buf)

    def finish(job: Job, buf: bytearray, h: Hashed) -> None:
        if job.read:
            p.target_read += job.length
        leaves.target.put(job.index * per, h.leaves)
        if h.leaves != job.old_source:
            repair.append(job.index)

    p.run(jobs, first, finish, HASH_WORKERS)
    return repair


def _punch_runs(fd: int, base: int, runs: list[tuple[int, int]]) -> tuple[int, int, list[tuple[int, int]]]:
    """On the punch thread: make each run (relative to base) read as zeros, then read them back.
    (bytes written where the filesystem could not punch, bytes read back, the runs that did not read
    as zeros)."""
    written = read = 0
    for x, y in runs:
        written += zero_range(fd, base + x, y - x)
    failed = []
    for x, y in runs:  # a hole reads as zeros: only a range the filesystem did not punch is read
        if not _is_hole(fd, base + x, base + y):
            read += y - x
            if not is_zero(pread(fd, y - x, base + x)):
                failed.append((x, y))
    return written, read, failed


def _is_hole(disk: Disk, start: int, end: int) -> bool:
    """Whether [start, end) of the disk is all hole (False when it cannot say)."""
    try:
        return next_data(disk, start) >= end
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data after start


def _merge_block_ranges(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for lo, hi in sorted((int(r[0]), int(r[1])) for r in ranges):
        if hi <= lo:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def _extents_by_grain(
    extents: Sequence[tuple[int, int]], size: int, bs: int, g_size: int
) -> dict[int, dict[int, list[tuple[int, int]]]]:
    """Changed extents rounded out to pages (the disk's short last page ends at its end), merged, then
    cut at grains: block index -> {grain: [(start, end) within the block]}, grains and runs in order.
    One sort (by offset: the merge takes the furthest end) and one pass, each merged range cut as soon
    as the next one starts past it: 10,000 extents take about 10 ms."""
    out: dict[int, dict[int, list[tuple[int, int]]]] = {}
    lo = hi = -1  # the merged range being built
    for offset, length in sorted(extents, key=itemgetter(0)):
        if offset < 0 or length < 0:
            raise ValueError(f"bad extent ({offset}, {length})")
        end = offset + length
        if end > size:
            end = size
        if end <= offset:
            continue
        offset -= offset % PAGE
        if end % PAGE:
            end += PAGE - end % PAGE
            if end > size:
                end = size
        if offset <= hi:
            if end > hi:
                hi = end
            continue
        if hi >= 0:
            _cut_at_grains(out, lo, hi, bs, g_size)
        lo, hi = offset, end
    if hi >= 0:
        _cut_at_grains(out, lo, hi, bs, g_size)
    return out


def _cut_at_grains(
    out: dict[int, dict[int, list[tuple[int, int]]]], offset: int, end: int, bs: int, g_size: int
) -> None:
    """Add [offset, end) to out, cut at grains (see _extents_by_grain)."""
    per, g = bs // g_size, offset // g_size
    while True:
        i, k = divmod(g, per)
        base, stop = i * bs, (g + 1) * g_size
        piece = (offset - base, (stop if stop < end else end) - base)
        if (grains := out.get(i)) is None:
            out[i] = {k: [piece]}
        elif (runs := grains.get(k)) is None:
            grains[k] = [piece]
        else:
            runs.append(piece)
        if stop >= end:
            return
        offset, g = stop, g + 1
