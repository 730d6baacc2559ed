"""One pass over a disk: its jobs (one per block), the pipeline that runs them in block order with
reading and hashing on a small pool, and the writes, reads and hashes a pass is made of.

How a pass works is told in :mod:`.engine`; what a pass does with each block is in :mod:`.phase1`,
:mod:`.delta` and :mod:`.verify`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from .blockio import IO_CHUNK, NO_COPY_RANGE, PROBE, Disk, data_blocks, preadv, pwrite, zero_page_runs
from .blockmap import LEAF, Leaves, block_count, block_length, grain_for, leaves_of
from .nbd import NbdDisk
from .progress import Pacer, Progress, Reporter
from .results import TransferCancelled, TransferStateError
from .sparse import is_zero, zero_bytes, zero_range

CPUS = os.cpu_count() or 2
COPY_WORKERS = max(1, min(3, CPUS - 1))  # hashers beside the thread doing the copy
HASH_WORKERS = max(1, min(4, CPUS))  # readers+hashers for read-only passes and deltas
BUFFER_BUDGET = 32 << 20  # bytes of block buffers in flight per pass (at least 3 buffers)

ProgressCallback = Callable[[Progress], None]


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Controls:
    """What the caller sets for its passes: progress reports, cancel, the bandwidth limit, and the
    pacer that enforces the limit (a class or factory; each pass makes its own)."""

    progress: ProgressCallback | None = None
    progress_interval: float = 0.25
    cancel: CancelFlag | None = None
    bandwidth_limit_bps: float | None = None
    pacer: Callable[[float | None], Pacer] = Pacer


@dataclass(slots=True)
class Job:
    index: int
    offset: int
    length: int
    work: int  # progress bytes this block accounts for
    segments: tuple[tuple[int, int], ...] = ()  # full copy: data ranges in the block, relative
    grains: tuple[int, ...] = ()  # delta: grains of the block to look at, relative
    old_source: bytes = b""  # delta: the block's leaves
    old_target: bytes = b""
    read: bool = True  # False: nothing to read (a hole)
    changed: dict[int, list[tuple[int, int]]] | None = None  # tracked delta: grain -> changed pages, relative


@dataclass(slots=True)
class Hashed:
    leaves: bytes = b""  # full copy: the block's leaves
    copied: bool = False  # full copy: the block went in by copy_file_range
    new: dict[int, bytes] = dataclasses.field(default_factory=dict)  # delta: grain -> new source leaf
    plans: dict[int, list[tuple[int, int]] | None] = dataclasses.field(default_factory=dict)  # None: punch
    spare: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # delta: zero pages to give back
    writes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # delta: page runs to write
    zeros: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # delta: page runs to punch
    cut: dict[int, list[tuple[int, int, bool]]] = dataclasses.field(default_factory=dict)  # delta: see _io_runs
    zero_grains: int = 0  # delta: bytes of the grains punched whole; full copy over NBD: zero pages skipped
    target_read: int = 0
    source_read: int = 0  # delta: bytes read from the source


Work = Callable[[], Hashed]
_Window = deque[tuple[Job, bytearray, "Future[Hashed] | _Done | Later", Work | None]]


class Pass:
    def __init__(self, *, block_size: int, controls: Controls, src_fd: Disk, dst_fd: Disk = -1) -> None:
        self.bs = block_size
        self.grain = grain_for(block_size)
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.cancel = controls.cancel
        self.reporter = Reporter(0, controls.progress, controls.progress_interval)
        self.pacer = controls.pacer(controls.bandwidth_limit_bps)
        self.depth = max(3, min(12, BUFFER_BUDGET // block_size))
        self.position = 0  # full copy: every block below is in the target and the leaves
        self.bytes_read = 0
        self.bytes_written = 0
        self.target_read = 0
        self.zero_skipped = 0
        self.before_write: Callable[[], None] = lambda: None
        self._local = threading.local()
        # copy_file_range only between two files; an NBD side reads and writes through the buffers
        self.copy_range_ok = (
            hasattr(os, "copy_file_range") and not isinstance(src_fd, NbdDisk) and not isinstance(dst_fd, NbdDisk)
        )
        self._probe = bytearray(PROBE)
        self.zeros = zero_bytes(block_size)  # only ever read; shared, not allocated (and zeroed) per pass

    # ---- in the calling thread

    def tick(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise TransferCancelled("transfer cancelled")
        self.reporter.maybe_emit()

    def sleep(self, seconds: float) -> None:
        end = self.pacer.now() + seconds
        while (left := end - self.pacer.now()) > 0:
            self.pacer.sleep(min(left, 0.05))
            self.tick()

    def _wrote(self, n: int) -> None:
        self.bytes_written += n
        self.reporter.written = self.bytes_written
        if self.pacer.active:
            delay = self.pacer.delay_after(n)
            if delay > 0:
                self.sleep(delay)

    def write(self, data: memoryview, offset: int) -> None:
        self.before_write()
        # an NBD write is a round trip: one request per run (up to the block), not per 256 KiB
        io_chunk = self.bs if isinstance(self.dst_fd, NbdDisk) else IO_CHUNK
        chunk = min(io_chunk, self.pacer.chunk_size(len(data)))
        done = 0
        while done < len(data):
            n = pwrite(self.dst_fd, data[done : done + chunk], offset + done)
            done += n
            self._wrote(n)

    def zero(self, offset: int, length: int) -> None:
        """Make a target range read as zeros: a hole where the filesystem can punch one."""
        self.before_write()
        n = zero_range(self.dst_fd, offset, length)
        if n:
            self._wrote(n)

    def put(self, buf: bytearray, base: int, a: int, b: int) -> None:
        """Write buf[a:b] at base+a, punching its whole zero pages instead of writing them."""
        for x, y, zero in zero_page_runs(buf, a, b):
            if zero:
                self.zero(base + x, y - x)
            else:
                self.write(memoryview(buf)[x:y], base + x)

    def copy_range(self, offset: int, length: int) -> bool:
        """Copy [offset, offset+length) src -> dst in the kernel. False if the kernel cannot copy
        between these files."""
        self.before_write()
        chunk = self.pacer.chunk_size(length)
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(
                    self.src_fd, self.dst_fd, min(chunk, length - done), offset + done, offset + done
                )
            except OSError as exc:
                if exc.errno in NO_COPY_RANGE:
                    self.copy_range_ok = False
                    return False
                raise
            if n == 0:
                raise TransferStateError(f"source ended at {offset + done}, inside its recorded size")
            done += n
            self._wrote(n)
        return True

    def probe_has_data(self, job: Job) -> bool:
        """Whether the first page of the block's data is non-zero (then the block surely is)."""
        start = job.segments[0][0] if job.segments else 0
        n = min(PROBE, job.length - start)
        got = preadv(self.src_fd, memoryview(self._probe)[:n], job.offset + start)
        return not is_zero(self._probe, 0, got)

    def write_runs(self, buf: bytearray, base: int, runs: list[tuple[int, int]]) -> None:
        """Write buf[x:y] at base+x for each run: over NBD all at once (when no bandwidth limit paces
        them), else one after the other."""
        if runs and isinstance(self.dst_fd, NbdDisk) and not self.pacer.active:
            self.before_write()
            self._wrote(self.dst_fd.pwrite_many(memoryview(buf), base, runs))
            return
        if runs and not self.pacer.active:  # a file, no limit: one pwrite per run (a delta's are small)
            self.before_write()
            view, dfd, done = memoryview(buf), self.dst_fd, 0
            for x, y in runs:
                while x < y:
                    n = os.pwrite(dfd, view[x : min(y, x + IO_CHUNK)], base + x)
                    x, done = x + n, done + n
            self._wrote(done)
            return
        for x, y in runs:
            self.write(memoryview(buf)[x:y], base + x)

    def write_new(self, buf: bytearray, base: int, a: int, b: int) -> None:
        """Write buf[a:b] at base+a into a range the target does not hold yet."""
        self.write(memoryview(buf)[a:b], base + a)

    def run(
        self,
        jobs: Iterable[Job],
        first: Callable[[Job, bytearray], Hashed | Work | Later],
        finish: Callable[[Job, bytearray, Hashed], None],
        workers: int,
    ) -> None:
        """For each job: ``first`` here (it may do I/O; it returns the result, or work for the pool),
        then ``finish`` here, in block order. At most ``depth`` jobs (and buffers) are in flight; when
        this thread would wait for the pool, it does the newest work the pool has not started."""
        self.reporter.maybe_emit()
        free = _take_buffers(self.bs, self.depth)
        window: _Window = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="transfer") as pool:
            try:
                for job in jobs:
                    self._drain(window, free, finish, self.depth - 1)
                    buf = free.pop() if free else bytearray(self.bs)
                    out = first(job, buf)
                    if isinstance(out, Hashed):
                        window.append((job, buf, _Done(out), None))
                    elif isinstance(out, Later):
                        window.append((job, buf, out, None))
                    else:
                        window.append((job, buf, pool.submit(out), out))
                    while window and window[0][2].done():
                        self._finish_oldest(window, free, finish)
                    self.tick()
                self._drain(window, free, finish, 0)
            finally:
                for _, _, fut, _ in window:
                    fut.cancel()
        _give_buffers(self.bs, free)

    def _drain(
        self, window: _Window, free: list[bytearray], finish: Callable[[Job, bytearray, Hashed], None], keep: int
    ) -> None:
        """Finish jobs in order until at most ``keep`` are in flight, doing unstarted work here."""
        while len(window) > keep:
            if not window[0][2].done() and self._steal(window):
                continue
            self._finish_oldest(window, free, finish)

    def _steal(self, window: _Window) -> bool:
        """Do here the newest work no pool thread has started; False if there is none."""
        for i in range(len(window) - 1, -1, -1):
            job, buf, fut, work = window[i]
            if work is not None and fut.cancel():
                window[i] = (job, buf, _Done(work()), None)
                return True
        return False

    def _finish_oldest(
        self, window: _Window, free: list[bytearray], finish: Callable[[Job, bytearray, Hashed], None]
    ) -> None:
        job, buf, fut, _ = window[0]
        wait = max(0.01, min(self.reporter.interval or 0.05, 0.25))
        while True:
            try:
                result = fut.result(timeout=wait)
                break
            except TimeoutError:
                self.tick()
        finish(job, buf, result)
        window.popleft()
        free.append(buf)
        self.tick()

    # ---- in any thread

    def read(self, fd: Disk, buf: bytearray, start: int, end: int, base: int) -> None:
        """Fill buf[start:end] with fd's bytes at base+start."""
        if type(fd) is int and os.preadv(fd, [memoryview(buf)[start:end]], base + start) == end - start:
            return  # a file: one call, unless it ends first (then read on below, and fail)
        view = memoryview(buf)
        got = start
        while got < end:
            n = preadv(fd, view[got:end], base + got)
            if n == 0:
                raise TransferStateError(f"file ended at {base + got}, inside its recorded size")
            got += n

    def scratch(self, n: int) -> bytearray:
        """This thread's spare buffer, of at least n bytes: a grain's unless more is asked for (a
        block's, 4 MiB zero-filled, cost 0.4 ms to make, per thread and pass, for a page's reads)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = bytearray(max(n, self.grain))
        return buf

    def grain_scratches(self) -> tuple[bytearray, bytearray]:
        """This thread's two grain buffers for a quiet tracked delta (see examine's _read_named): one
        kept all zeros between uses, one for a grain read whole. Each fits in the CPU's cache: a grain
        read and hashed there cost 2.5 µs less than in a block's buffer, cold at every block."""
        pair = getattr(self._local, "grains", None)
        if pair is None:
            pair = self._local.grains = (bytearray(self.grain), bytearray(self.grain))
        return pair

    # ---- on the pool

    def fill(self, fd: Disk, job: Job, buf: bytearray) -> list[tuple[int, int]]:
        """Read the block's data ranges from fd into buf, with zeros around them up to whole grains;
        returns those grain spans (the rest of the block is holes: zero leaves, nothing to read)."""
        n, segs = job.length, job.segments or ((0, job.length),)
        spans = list(_grain_spans(segs, self.grain, n))
        view, k = memoryview(buf), 0
        for lo, hi in spans:
            cur = lo
            while k < len(segs) and segs[k][0] < hi:
                a, b = segs[k]
                view[cur:a] = self.zeros[: a - cur]
                self.read(fd, buf, a, b, job.offset)
                cur, k = b, k + 1
            view[cur:hi] = self.zeros[: hi - cur]
        return spans

    def hash_copied(self, job: Job, buf: bytearray) -> Hashed:
        """The leaves of what copy_file_range put into the target, read back from its page cache."""
        h = self.hash_spans(job, buf, self.fill(self.dst_fd, job, buf))
        h.copied = True
        return h

    def hash_spans(self, job: Job, buf: bytearray, spans: Sequence[tuple[int, int]]) -> Hashed:
        """The block's leaves from buf, where only ``spans`` may hold anything but zeros."""
        g = self.grain
        if spans == [(0, job.length)]:
            return Hashed(leaves_of(buf, 0, job.length, g))
        leaves = bytearray(LEAF * block_count(job.length, g))
        for a, b in spans:
            leaves[a // g * LEAF : -(-b // g) * LEAF] = leaves_of(buf, a, b, g)
        return Hashed(bytes(leaves))

    def hash_buffer(self, job: Job, buf: bytearray) -> Hashed:
        return Hashed(leaves_of(buf, 0, job.length, self.grain))

    def hash_file(self, fd: Disk, job: Job, buf: bytearray) -> Hashed:
        if not job.read:
            return Hashed(bytes(LEAF * block_count(job.length, self.grain)))
        self.read(fd, buf, 0, job.length, job.offset)
        return Hashed(leaves_of(buf, 0, job.length, self.grain))


_spare: dict[int, list[bytearray]] = {}
_spare_lock = threading.Lock()
SPARE_BUFFERS = 12  # block buffers kept for the next pass, per block size


def _take_buffers(bs: int, n: int) -> list[bytearray]:
    """Up to n block buffers a pass left: a new one is 4 MiB zero-filled and faulted in, 0.5-2 ms on
    this VM, and a pass that keeps its window full (NBD) makes eight."""
    with _spare_lock:
        have = _spare.get(bs, [])
        taken, _spare[bs] = have[:n], have[n:]
    return taken


def _give_buffers(bs: int, bufs: list[bytearray]) -> None:
    """Keep a finished pass's buffers for the next (only those back in its free list: none a pool
    thread or a read in flight may still write to)."""
    with _spare_lock:
        have = _spare.setdefault(bs, [])
        have.extend(bufs[: max(0, SPARE_BUFFERS - len(have))])


class Later:
    """Work the calling thread does when the window reaches its block, not at once and not on the pool
    (reads over NBD: ``first`` asks for them, so the reads of the blocks in the window are in flight
    together, and the block is examined when it is the oldest). ``abandon`` runs if the pass stops
    before then."""

    __slots__ = ("_abandon", "_result", "_work")

    def __init__(self, work: Work, abandon: Callable[[], None]) -> None:
        self._work, self._abandon = work, abandon
        self._result: Hashed | None = None

    def done(self) -> bool:
        return self._result is not None

    def result(self, timeout: float | None = None) -> Hashed:
        if self._result is None:
            self._result = self._work()
        return self._result

    def cancel(self) -> bool:
        if self._result is None:
            self._abandon()
        return False


class _Done:
    """A result already there, in the window beside the pool's futures (a Future with its lock and
    condition cost more than the small block of a tracked delta it carries)."""

    __slots__ = ("_result",)

    def __init__(self, result: Hashed) -> None:
        self._result = result

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Hashed:
        return self._result

    def cancel(self) -> bool:
        return False


def _grain_spans(segments: Sequence[tuple[int, int]], grain: int, n: int) -> Iterator[tuple[int, int]]:
    """The data ranges rounded out to whole grains (the last one may end at n), merged."""
    lo = hi = -1
    for a, b in segments:
        a, b = a // grain * grain, min(n, -(-b // grain) * grain)
        if a > hi:
            if hi > lo:
                yield lo, hi
            lo = a
        hi = max(hi, b)
    if hi > lo:
        yield lo, hi


# --------------------------------------------------------------------------------------------------
# Jobs from the leaves


def block_leaves(leaves: Leaves, size: int, bs: int, g_size: int) -> Iterator[tuple[int, bytes, bytes]]:
    """(index, source leaves, target leaves) of every block, streaming (256 blocks per read)."""
    per = bs // g_size
    n_blocks = block_count(size, bs)
    for first in range(0, n_blocks, 256):
        count = min(256, n_blocks - first)
        grains = min(count * per, leaves.source.n_grains - first * per)
        s = leaves.source.get(first * per, grains)
        t = leaves.target.get(first * per, grains)
        for k in range(count):
            yield first + k, s[k * per * LEAF : (k + 1) * per * LEAF], t[k * per * LEAF : (k + 1) * per * LEAF]


def verify_jobs(fd: Disk, leaves: Leaves, size: int, bs: int, g_size: int) -> Iterator[Job]:
    """A job for every block holding data in fd or non-zero target leaves, with both sides' leaves."""
    data = data_blocks(fd, 0, size, bs)
    next_data = next(data, None)
    for index, s, t in block_leaves(leaves, size, bs, g_size):
        has_data = next_data is not None and next_data[0] == index
        if has_data:
            next_data = next(data, None)
        if has_data or t.count(0) != len(t) or s.count(0) != len(s):
            n = block_length(index, size, bs)
            yield Job(index, index * bs, n, n if has_data else 0, old_source=s, old_target=t, read=has_data)
