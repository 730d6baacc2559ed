"""The disk transfer engine: phase 1 (full copy), phase 2 (delta), verification.

A pass walks the disk block by block (4 MiB by default) in the calling thread, which does the writing,
updates the leaf files (see :mod:`.blockmap`) in block order, reports progress and honours cancel and
the bandwidth limit. Reading and hashing (BLAKE3 per 64 KiB grain; it releases the GIL, as does all
I/O) run beside it on a small thread pool. A fixed number of block buffers circulate, so memory is
about ``(depth + workers) x block_size`` whatever the disk size.

Phase 1 copies each block's data ranges with copy_file_range (in the kernel, no copy through user
space), then a pool thread reads the block back from the target's page cache and computes its leaves:
the leaves record exactly the bytes that went into the target, even though phase 1 runs while the
replica is in use and a source block may change while it is copied. Grains found all zero are punched
out again. Blocks whose first data page is zeros are read into a buffer instead and only their
non-zero pages are written.

A delta (catch-up or the final one) reads, on the pool, only the grains it must look at — those the
change tracking names (rounded out to grains), or every grain holding data for the digest method —
and computes their leaves. A grain whose new leaf equals the target's leaf is done. For the others it
finds the 4 KiB pages to write: the source's non-zero pages when the target grain is known to be
zeros, else the pages that differ from a read of the target grain (so a coarse change tracking, or an
extent rewritten with the same bytes, costs reads, not writes). Zero pages are punched, never written, so the target keeps
its holes. What was written is read back at once and compared with what was read from the source;
only then does the target's leaf move. Writes therefore follow the changed pages, reads follow the
changed grains (tracked) or the source's data (digest), and the switch needs no re-read of either
disk: :func:`verify_changes` computes both disk digests from the leaves.

Callbacks run in the calling thread, so a caller may use its own database connection there, and an
exception raised by a callback stops the pass and propagates (the checkpoint is kept). ``cancel`` is
any object with ``is_set()``; it is asked in the calling thread at least once per block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import mmap
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import blake3

from .blockmap import (
    LEAF,
    ZERO_LEAF,
    DiskState,
    Leaves,
    TreeDigest,
    block_count,
    block_length,
    fingerprint,
    grain_for,
    leaves_of,
    save_state,
    seal,
)
from .progress import Pacer, Progress, Reporter
from .sparse import allocated_bytes, data_extents, is_zero, zero_range

__all__ = [
    "CopyResult",
    "DiskProof",
    "Progress",
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

CPUS = os.cpu_count() or 2
COPY_WORKERS = max(1, min(3, CPUS - 1))  # hashers beside the thread doing the copy
HASH_WORKERS = max(1, min(4, CPUS))  # readers+hashers for read-only passes and deltas
BUFFER_BUDGET = 32 << 20  # bytes of block buffers in flight per pass (at least 3 buffers)
MAX_BLOCK_SIZE = 64 << 20
IO_CHUNK = 256 << 10  # pwrite size
PAGE = 4096
PROBE = 4096
_ZERO_PAGE = bytes(PAGE)
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}

ProgressCallback = Callable[[Progress], None]


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class TransferCancelled(Exception):
    """The pass stopped because its cancel flag was set. The checkpoint is kept."""


class VerificationError(Exception):
    """The target does not hold what the leaves say. ``offset`` is the first bad grain's."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class TransferStateError(RuntimeError):
    """The state directory does not fit the request (no completed full copy, other disk, ...)."""


@dataclass(frozen=True)
class CopyResult:
    method: str  # "full" | "tracked" | "digest"
    bytes_total: int
    bytes_read: int  # from the source
    bytes_written: int  # to the target (punched holes count zero)
    zero_bytes_skipped: int
    seconds: float
    digest: str  # disk digest of the target after this pass (from its leaves)
    resumed_from: int  # byte offset resumed from (0 when fresh)
    source_digest: str = ""  # disk digest of the source as this pass left its leaves
    target_bytes_read: int = 0  # target grains read to compare, read back, or re-read
    target_untouched: bool = True  # False: the target had changed since the last pass and was re-read


@dataclass(frozen=True)
class DiskProof:
    """What :func:`verify_changes` established about one disk."""

    source_digest: str
    target_digest: str
    identical: bool
    source_sealed: bool  # the source had not changed since the last delta (else re-read in full)
    target_sealed: bool  # the target had not changed since the last delta (else re-read in full)
    bytes_read: int
    sampled_grains: int
    seconds: float


# --------------------------------------------------------------------------------------------------
# One pass


@dataclass(slots=True)
class _Job:
    index: int
    offset: int
    length: int
    work: int  # progress bytes this block accounts for
    segments: tuple[tuple[int, int], ...] = ()  # full copy: data ranges in the block, relative
    grains: tuple[int, ...] = ()  # delta: grains of the block to look at, relative
    old_source: bytes = b""  # delta: the block's leaves
    old_target: bytes = b""
    read: bool = True  # False: nothing to read (a hole)


@dataclass(slots=True)
class _Hashed:
    leaves: bytes = b""  # full copy: the block's leaves
    copied: bool = False  # full copy: the block went in by copy_file_range
    new: dict[int, bytes] = dataclasses.field(default_factory=dict)  # delta: grain -> new source leaf
    plans: dict[int, list[tuple[int, int]] | None] = dataclasses.field(default_factory=dict)  # None: punch
    target_read: int = 0


_Work = Callable[[], _Hashed]


class _Pass:
    def __init__(
        self,
        *,
        block_size: int,
        src_fd: int,
        dst_fd: int = -1,
        progress: ProgressCallback | None,
        progress_interval: float,
        bandwidth_limit_bps: float | None = None,
        cancel: CancelFlag | None,
    ) -> None:
        self.bs = block_size
        self.grain = grain_for(block_size)
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.cancel = cancel
        self.reporter = Reporter(0, progress, progress_interval)
        self.pacer = Pacer(bandwidth_limit_bps)
        self.depth = max(3, min(12, BUFFER_BUDGET // block_size))
        self.position = 0  # full copy: every block below is in the target and the leaves
        self.bytes_read = 0
        self.bytes_written = 0
        self.target_read = 0
        self.zero_skipped = 0
        self.copy_range_ok = hasattr(os, "copy_file_range")
        self.before_write: Callable[[], None] = lambda: None
        self._local = threading.local()
        self._probe = bytearray(PROBE)

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
        chunk = min(IO_CHUNK, self.pacer.chunk_size(len(data)))
        done = 0
        while done < len(data):
            n = os.pwrite(self.dst_fd, data[done : done + chunk], offset + done)
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
        for x, y, zero in _zero_page_runs(buf, a, b):
            if zero:
                self.zero(base + x, y - x)
            else:
                self.write(memoryview(buf)[x:y], base + x)

    def copy_range(self, offset: int, length: int) -> bool:
        """Copy [offset, offset+length) src -> dst in the kernel. False if the kernel cannot."""
        self.before_write()
        chunk = self.pacer.chunk_size(length)
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(
                    self.src_fd, self.dst_fd, min(chunk, length - done), offset + done, offset + done
                )
            except OSError as exc:
                if exc.errno in _NO_COPY_RANGE:
                    self.copy_range_ok = False
                    return False
                raise
            if n == 0:
                raise TransferStateError(f"source ended at {offset + done}, inside its recorded size")
            done += n
            self._wrote(n)
        return True

    def probe_has_data(self, job: _Job) -> bool:
        """Whether the first page of the block's data is non-zero (then the block surely is)."""
        start = job.segments[0][0] if job.segments else 0
        n = min(PROBE, job.length - start)
        got = os.preadv(self.src_fd, [memoryview(self._probe)[:n]], job.offset + start)
        return not is_zero(self._probe, 0, got)

    def run(
        self,
        jobs: Iterable[_Job],
        first: Callable[[_Job, bytearray], _Hashed | _Work],
        finish: Callable[[_Job, bytearray, _Hashed], None],
        workers: int,
    ) -> None:
        """For each job: ``first`` here (it may do I/O; it returns the result, or work for the pool),
        then ``finish`` here, in block order. At most ``depth`` jobs (and buffers) are in flight."""
        self.reporter.maybe_emit()
        free: list[bytearray] = []
        window: deque[tuple[_Job, bytearray, Future[_Hashed]]] = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="transfer") as pool:
            try:
                for job in jobs:
                    while len(window) >= self.depth:
                        self._finish_oldest(window, free, finish)
                    buf = free.pop() if free else bytearray(self.bs)
                    out = first(job, buf)
                    if isinstance(out, _Hashed):
                        fut: Future[_Hashed] = Future()
                        fut.set_result(out)
                    else:
                        fut = pool.submit(out)
                    window.append((job, buf, fut))
                    while window and window[0][2].done():
                        self._finish_oldest(window, free, finish)
                    self.tick()
                while window:
                    self._finish_oldest(window, free, finish)
            finally:
                for _, _, fut in window:
                    fut.cancel()

    def _finish_oldest(
        self,
        window: deque[tuple[_Job, bytearray, Future[_Hashed]]],
        free: list[bytearray],
        finish: Callable[[_Job, bytearray, _Hashed], None],
    ) -> None:
        job, buf, fut = window[0]
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

    def read(self, fd: int, buf: bytearray, start: int, end: int, base: int) -> None:
        """Fill buf[start:end] with fd's bytes at base+start."""
        view = memoryview(buf)
        got = start
        while got < end:
            n = os.preadv(fd, [view[got:end]], base + got)
            if n == 0:
                raise TransferStateError(f"file ended at {base + got}, inside its recorded size")
            got += n

    def scratch(self) -> bytearray:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(self.bs)
        return buf

    # ---- on the pool

    def hash_target(self, job: _Job) -> _Hashed:
        """The leaves of what copy_file_range put into the target (read back from the page cache)."""
        m = mmap.mmap(self.dst_fd, job.length, mmap.MAP_SHARED | _POPULATE, mmap.PROT_READ, offset=job.offset)
        try:
            view = memoryview(m)
            try:
                return _Hashed(_mapped_leaves(view, self.grain, job.segments or ((0, job.length),)), copied=True)
            finally:
                view.release()
        finally:
            m.close()

    def hash_buffer(self, job: _Job, buf: bytearray) -> _Hashed:
        return _Hashed(leaves_of(buf, 0, job.length, self.grain))

    def hash_file(self, fd: int, job: _Job, buf: bytearray) -> _Hashed:
        if not job.read:
            return _Hashed(bytes(LEAF * block_count(job.length, self.grain)))
        self.read(fd, buf, 0, job.length, job.offset)
        return _Hashed(leaves_of(buf, 0, job.length, self.grain))

    def examine(self, job: _Job, buf: bytearray) -> _Hashed:
        """Delta: read the job's grains from the source, compute their leaves, and plan what to write
        for each grain the target does not hold yet (comparing with the target where needed)."""
        g_size = self.grain
        if job.read:
            for g0, g1 in _runs(job.grains):
                self.read(self.src_fd, buf, g0 * g_size, min(g1 * g_size, job.length), job.offset)
        out = _Hashed()
        view = memoryview(buf)
        for g in job.grains:
            a, b = g * g_size, min((g + 1) * g_size, job.length)
            if not job.read or is_zero(buf, a, b):
                leaf = ZERO_LEAF
            else:
                leaf = blake3.blake3(view[a:b]).digest(LEAF)
            out.new[g] = leaf
            old_t = job.old_target[g * LEAF : (g + 1) * LEAF]
            if leaf == old_t:
                continue  # the target holds it already
            if leaf == ZERO_LEAF:
                out.plans[g] = None
            elif old_t == ZERO_LEAF:  # the target grain is zeros: write the source's non-zero pages
                out.plans[g] = [(x, y) for x, y, zero in _zero_page_runs(buf, a, b) if not zero]
            else:
                out.plans[g] = self.differing_pages(job, buf, a, b)
                out.target_read += b - a
        return out

    def differing_pages(self, job: _Job, buf: bytearray, a: int, b: int) -> list[tuple[int, int]]:
        """The page runs of buf[a:b] that differ from the target's bytes there."""
        t = self.scratch()
        self.read(self.dst_fd, t, 0, b - a, job.offset + a)
        runs: list[tuple[int, int]] = []
        for x in range(a, b, PAGE):
            y = min(x + PAGE, b)
            if buf[x:y] != t[x - a : y - a]:
                if runs and runs[-1][1] == x:
                    runs[-1] = (runs[-1][0], y)
                else:
                    runs.append((x, y))
        return runs


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _mapped_leaves(view: memoryview, grain: int, segments: Sequence[tuple[int, int]]) -> bytes:
    """leaves_of for a read-only mapping of a copied block: grains outside its data ranges were not
    copied (zeros); a zero grain is rare inside copied data, so test its ends first."""
    out = []
    n = len(view)
    for a in range(0, n, grain):
        b = min(a + grain, n)
        part = view[a:b]
        if not any(x < b and y > a for x, y in segments) or (
            view[a] == 0 and view[b - 1] == 0 and part.tobytes() == bytes(b - a)
        ):
            out.append(ZERO_LEAF)
        else:
            out.append(blake3.blake3(part).digest(LEAF))
    return b"".join(out)


def _runs(grains: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Consecutive grains as [g0, g1) runs (grains sorted)."""
    start = prev = -2
    for g in grains:
        if g != prev + 1:
            if start >= 0:
                yield start, prev + 1
            start = g
        prev = g
    if start >= 0:
        yield start, prev + 1


def _zero_page_runs(buf: bytearray, a: int, b: int) -> list[tuple[int, int, bool]]:
    """buf[a:b] cut into runs, each flagged True when it is whole, aligned, all-zero pages (offsets
    in buf are aligned like the file: blocks start on a page)."""
    if buf.find(_ZERO_PAGE, a, b) < 0:
        return [(a, b, False)]
    runs: list[tuple[int, int, bool]] = []

    def add(x: int, y: int, zero: bool) -> None:
        if y <= x:
            return
        if runs and runs[-1][2] == zero and runs[-1][1] == x:
            runs[-1] = (runs[-1][0], y, zero)
        else:
            runs.append((x, y, zero))

    p0 = -(-a // PAGE) * PAGE
    add(a, min(p0, b), False)
    x = p0
    while x + PAGE <= b:
        add(x, x + PAGE, is_zero(buf, x, x + PAGE))
        x += PAGE
    add(max(x, p0), b, False)
    return runs


def _write_ranges(job: _Job, buf: bytearray) -> tuple[tuple[int, int], ...]:
    """What of a non-zero block to write in a full copy: its data ranges, and any "hole" that holds
    data after all (the source is live: data may land there between lseek and read)."""
    n = job.length
    if not job.segments or job.segments == ((0, n),):
        return ((0, n),)
    ranges: list[tuple[int, int]] = []
    cur = 0
    for a, b in (*job.segments, (n, n)):
        if a > cur and not is_zero(buf, cur, a):
            a = cur
        if b > a:
            if ranges and ranges[-1][1] >= a:
                ranges[-1] = (ranges[-1][0], max(b, ranges[-1][1]))
            else:
                ranges.append((a, b))
        cur = max(cur, b)
    return tuple(ranges)


class _Checkpointer:
    """Saves the checkpoint every ``interval`` seconds from a background thread.

    When durable, the target and the leaves are flushed (fdatasync) before the checkpoint that claims
    them, so it survives a power loss too, not only a killed worker; the flush runs beside the copy.
    """

    def __init__(self, save: Callable[[], None], interval: float) -> None:
        self._save = save
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-checkpoint", daemon=True)

    def __enter__(self) -> _Checkpointer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._save()
            except Exception:  # e.g. no space for state.json: try again next time; the final save reports
                pass


# --------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _opened(path: str, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def _check_block_size(block_size: int) -> None:
    if block_size < 4096 or block_size % 4096 or block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be a multiple of 4096 up to {MAX_BLOCK_SIZE}, not {block_size}")


def _data_blocks(fd: int, start: int, end: int, bs: int) -> Iterator[tuple[int, tuple[tuple[int, int], ...]]]:
    """(index, data ranges relative to the block) for each block of [start, end) holding data."""
    current = -1
    segs: list[tuple[int, int]] = []
    for d, h in data_extents(fd, start, end):
        while d < h:
            index = d // bs
            base = index * bs
            e = min(h, base + bs)
            if index != current:
                if current >= 0:
                    yield current, tuple(segs)
                current, segs = index, []
            segs.append((d - base, e - base))
            d = e
    if current >= 0:
        yield current, tuple(segs)


def _block_leaves(leaves: Leaves, size: int, bs: int, g_size: int) -> Iterator[tuple[int, bytes, bytes]]:
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


def _extents_by_block(extents: Sequence[tuple[int, int]], size: int, bs: int) -> dict[int, list[tuple[int, int]]]:
    """Changed extents cut at block boundaries: block index -> [(start, end) within the block], merged."""
    parts: dict[int, list[tuple[int, int]]] = {}
    for offset, length in extents:
        if offset < 0 or length < 0:
            raise ValueError(f"bad extent ({offset}, {length})")
        end = min(offset + length, size)
        while offset < end:
            i = offset // bs
            stop = min(end, (i + 1) * bs)
            parts.setdefault(i, []).append((offset - i * bs, stop - i * bs))
            offset = stop
    for i, pieces in parts.items():
        pieces.sort()
        merged = [list(pieces[0])]
        for a, b in pieces[1:]:
            if a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        parts[i] = [(a, b) for a, b in merged]
    return parts


def _load_state(state_dir: str, size: int, block_size: int | None) -> DiskState:
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


def _fadvise(fd: int, advice: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, advice)


def _finish_state(state: DiskState, leaves: Leaves, sfd: int, dfd: int) -> None:
    """Both digests from the leaves, and fresh seals of both files (after the engine's last write)."""
    state.digest = leaves.target.digest(state.size, state.grain)
    state.source_digest = leaves.source.digest(state.size, state.grain)
    state.target_seal = seal(dfd)
    state.source_seal = fingerprint(sfd)


# --------------------------------------------------------------------------------------------------
# The API


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
    started = time.monotonic()
    _check_block_size(block_size)
    os.makedirs(state_dir, exist_ok=True)
    bs = block_size
    with _opened(src, os.O_RDONLY) as sfd, _opened(dst, os.O_RDWR | os.O_CREAT) as dfd:
        size = os.fstat(sfd).st_size
        n_blocks = block_count(size, bs)
        g_size = grain_for(bs)
        n_grains = block_count(size, g_size)
        state = DiskState.load(state_dir)
        resume = (
            state is not None
            and state.size == size
            and state.block_size == bs
            and state.position % bs == 0
            and state.same_target(dfd)
            and os.fstat(dfd).st_size == size
            and Leaves.exist(state_dir, n_grains)
        )
        if resume:
            assert state is not None
            position = size if state.complete else state.position
        else:
            position = 0
            if os.fstat(dfd).st_size != size:
                os.ftruncate(dfd, size)
            state = DiskState.new(size, bs, dfd)
        if resume and state.complete and state.digest:
            Reporter(0, progress, progress_interval).final()
            return CopyResult(
                "full", 0, 0, 0, 0, time.monotonic() - started, state.digest, size, state.source_digest or ""
            )

        # Whatever lies in dst past the checkpoint was written after it (or by someone else): clear it,
        # so that the blocks skipped as holes or zeros do read as zeros.
        for a, b in list(data_extents(dfd, position, size)):
            zero_range(dfd, a, b - a)
        with Leaves(state_dir, n_grains, fresh=not resume) as leaves:
            if resume:
                leaves.clear_from(position // g_size)
            else:
                save_state(state_dir, state, durable=durable)
            p = _Pass(
                block_size=bs,
                src_fd=sfd,
                dst_fd=dfd,
                progress=progress,
                progress_interval=progress_interval,
                bandwidth_limit_bps=bandwidth_limit_bps,
                cancel=cancel,
            )
            p.position = position
            p.reporter.total = allocated_bytes(sfd, position, size)
            _fadvise(sfd, os.POSIX_FADV_SEQUENTIAL)

            def first(job: _Job, buf: bytearray) -> _Hashed | _Work:
                if p.copy_range_ok and p.probe_has_data(job):
                    if all(p.copy_range(job.offset + a, b - a) for a, b in job.segments):
                        p.bytes_read += job.work
                        # Hashed here, not on the pool: blake3 keeps the GIL for a 64 KiB leaf, and a
                        # pool thread holding it would stall this thread after every system call.
                        return p.hash_target(job)
                p.read(sfd, buf, 0, job.length, job.offset)
                p.bytes_read += job.length
                if is_zero(buf, 0, job.length):
                    p.zero_skipped += job.work
                    return _Hashed(bytes(LEAF * block_count(job.length, g_size)))
                for a, b in _write_ranges(job, buf):
                    for x, y, zero in _zero_page_runs(buf, a, b):
                        if zero:
                            p.zero_skipped += y - x
                        else:
                            p.write(memoryview(buf)[x:y], job.offset + x)
                return lambda: p.hash_buffer(job, buf)

            def finish(job: _Job, buf: bytearray, h: _Hashed) -> None:
                first_grain = job.offset // g_size
                for k in range(len(h.leaves) // LEAF if h.copied else 0):
                    if h.leaves[k * LEAF : (k + 1) * LEAF] != ZERO_LEAF:
                        continue
                    a, b = k * g_size, min((k + 1) * g_size, job.length)
                    data = sum(min(y, b) - max(x, a) for x, y in job.segments if x < b and y > a)
                    p.zero_skipped += data
                    if h.copied and data:  # copied, then found empty: make the grain a hole again
                        zero_range(dfd, job.offset + a, b - a)
                leaves.source.put(first_grain, h.leaves)
                leaves.target.put(first_grain, h.leaves)
                p.reporter.done += job.work
                p.position = job.offset + job.length

            def checkpoint() -> None:
                pos = p.position
                if durable:
                    os.fdatasync(dfd)
                    leaves.sync()
                save_state(state_dir, dataclasses.replace(state, position=pos), durable=durable)

            jobs = (
                _Job(i, i * bs, block_length(i, size, bs), sum(b - a for a, b in segs), segs)
                for i, segs in _data_blocks(sfd, position, size, bs)
            )
            try:
                with _Checkpointer(checkpoint, checkpoint_interval):
                    p.run(jobs, first, finish, COPY_WORKERS)
            except BaseException:
                with contextlib.suppress(Exception):
                    checkpoint()
                raise
            if durable:
                os.fdatasync(dfd)
                leaves.sync()
            state.position, state.complete, state.pending = size, True, []
            _finish_state(state, leaves, sfd, dfd)
            save_state(state_dir, state, durable=durable)
    p.reporter.final()
    assert state.digest is not None
    return CopyResult(
        "full",
        p.reporter.total,
        p.bytes_read,
        p.bytes_written,
        p.zero_skipped,
        time.monotonic() - started,
        state.digest,
        position,
        state.source_digest or "",
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
) -> CopyResult:
    """Phase 2 / catch-up: bring dst from what the leaves record to src's current content.

    changed_extents (offset, length) given: method "tracked" — read only the grains (64 KiB) they
    touch, plus the blocks of an interrupted tracked pass. None: method "digest" — read all of src's
    data once and compare each grain's leaf. Either way only the 4 KiB pages that differ are written
    (zero pages are punched, never written), and what was written is read back and compared before
    the target's leaves move; grains already right cost no write.

    If the target changed since the engine's last pass (its seal is broken: someone wrote to the
    powered-off production disk), its data is re-read first and every grain that differs is repaired;
    CopyResult.target_untouched is then False. The leaves are updated block by block, so the call can
    be repeated, and a pass that died half-way is simply run again.
    block_size: None means the one recorded by full_copy.
    """
    started = time.monotonic()
    with _opened(src, os.O_RDONLY) as sfd, _opened(dst, os.O_RDWR) as dfd:
        size = os.fstat(sfd).st_size
        state = _load_state(state_dir, size, block_size)
        if not state.same_target(dfd):
            raise TransferStateError(f"{dst} is not the file the full copy wrote")
        bs, g_size = state.block_size, state.grain
        per = bs // g_size
        untouched = state.target_seal is not None and state.target_seal == fingerprint(dfd)
        p = _Pass(
            block_size=bs,
            src_fd=sfd,
            dst_fd=dfd,
            progress=progress,
            progress_interval=progress_interval,
            bandwidth_limit_bps=bandwidth_limit_bps,
            cancel=cancel,
        )
        applying = False

        def unseal() -> None:  # before the first write: a pass that dies leaves the target unsealed
            if state.target_seal is not None:
                state.target_seal = None
                save_state(state_dir, state, durable=durable)
            p.before_write = lambda: None

        p.before_write = unseal
        with Leaves(state_dir, block_count(size, g_size), fresh=False) as leaves:
            if not untouched:
                unseal()
                repair = _reread_target(p, leaves, dfd, size, bs)
                state.pending = _merge_block_ranges([*state.pending, *([i, i + 1] for i in repair)])
                save_state(state_dir, state, durable=durable)
            jobs: Iterable[_Job]
            if changed_extents is not None:
                method = "tracked"
                by_block = _extents_by_block(changed_extents, size, bs)
                leftover = {i for lo, hi in state.pending for i in range(lo, hi)}
                touched = [[i, i + 1] for i in by_block]
                state.pending = _merge_block_ranges([*touched, *state.pending])
                save_state(state_dir, state, durable=durable)

                def plan(i: int) -> tuple[int, tuple[int, ...]]:
                    n = block_length(i, size, bs)
                    if i in leftover or i not in by_block:
                        return n, tuple(range(block_count(n, g_size)))
                    grains = {g for a, b in by_block[i] for g in range(a // g_size, (b - 1) // g_size + 1)}
                    return n, tuple(sorted(grains))

                def grain_bytes(n: int, grains: tuple[int, ...]) -> int:
                    return sum(min((g + 1) * g_size, n) - g * g_size for g in grains)

                def tracked_jobs() -> Iterator[_Job]:
                    for lo, hi in state.pending:
                        for i in range(lo, hi):
                            n, grains = plan(i)
                            count = block_count(n, g_size)
                            yield _Job(
                                i, i * bs, n, grain_bytes(n, grains), grains=grains,
                                old_source=leaves.source.get(i * per, count),
                                old_target=leaves.target.get(i * per, count),
                            )

                p.reporter.total = sum(grain_bytes(*plan(i)) for lo, hi in state.pending for i in range(lo, hi))
                jobs = tracked_jobs()
            else:
                method = "digest"
                _fadvise(sfd, os.POSIX_FADV_SEQUENTIAL)
                p.reporter.total = sum(block_length(i, size, bs) for i, _ in _data_blocks(sfd, 0, size, bs))
                jobs = _compare_jobs(sfd, leaves, size, bs, g_size)

            def first(job: _Job, buf: bytearray) -> _Work:
                return lambda: p.examine(job, buf)

            def finish(job: _Job, buf: bytearray, h: _Hashed) -> None:
                nonlocal applying
                if job.read:
                    p.bytes_read += job.work
                p.target_read += h.target_read
                source = bytearray(job.old_source)
                target = bytearray(job.old_target)
                for g, leaf in h.new.items():
                    source[g * LEAF : (g + 1) * LEAF] = leaf
                bad = -1
                applying = True
                for g, plan in h.plans.items():
                    a, b = g * g_size, min((g + 1) * g_size, job.length)
                    if plan is None:
                        p.zero(job.offset + a, b - a)
                        p.zero_skipped += b - a
                        back = os.pread(dfd, b - a, job.offset + a)
                        p.target_read += b - a
                        ok = back.count(0) == len(back)
                    else:
                        for x, y in plan:
                            p.put(buf, job.offset, x, y)
                        ok = True
                        for x, y in plan:
                            p.target_read += y - x
                            ok = ok and os.pread(dfd, y - x, job.offset + x) == buf[x:y]
                    if ok:
                        target[g * LEAF : (g + 1) * LEAF] = h.new[g]
                    else:  # record what the target really holds, then stop
                        t = p.scratch()
                        p.read(dfd, t, 0, b - a, job.offset + a)
                        target[g * LEAF : (g + 1) * LEAF] = leaves_of(t, 0, b - a, g_size)
                        bad = job.offset + a if bad < 0 else bad
                first_grain = job.index * per
                leaves.source.put(first_grain, bytes(source))
                leaves.target.put(first_grain, bytes(target))
                applying = False
                p.reporter.done += job.work
                if bad >= 0:
                    raise VerificationError(f"{dst}: the write at offset {bad} did not read back as written", bad)

            try:
                p.run(jobs, first, finish, HASH_WORKERS)
            except BaseException:
                if not applying:  # stopped between grains: the leaves say what the target holds
                    with contextlib.suppress(Exception):
                        _close_delta(state_dir, state, leaves, sfd, dfd, durable=durable, keep_pending=True)
                raise
            _close_delta(state_dir, state, leaves, sfd, dfd, durable=durable, keep_pending=False)
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


def _close_delta(
    state_dir: str, state: DiskState, leaves: Leaves, sfd: int, dfd: int, *, durable: bool, keep_pending: bool
) -> None:
    if durable:
        os.fdatasync(dfd)
        leaves.sync()
    if not keep_pending:
        state.pending = []
    _finish_state(state, leaves, sfd, dfd)
    save_state(state_dir, state, durable=durable)


def _compare_jobs(fd: int, leaves: Leaves, size: int, bs: int, g_size: int) -> Iterator[_Job]:
    """Digest method: a job for every block that holds data in fd or non-zero leaves on either side."""
    data = _data_blocks(fd, 0, size, bs)
    next_data = next(data, None)
    for index, s, t in _block_leaves(leaves, size, bs, g_size):
        has_data = next_data is not None and next_data[0] == index
        if has_data:
            next_data = next(data, None)
        if has_data or s.count(0) != len(s) or t.count(0) != len(t):
            n = block_length(index, size, bs)
            yield _Job(
                index, index * bs, n, n if has_data else 0, grains=tuple(range(block_count(n, g_size))),
                old_source=s, old_target=t, read=has_data,
            )


def _reread_target(p: _Pass, leaves: Leaves, dfd: int, size: int, bs: int) -> list[int]:
    """Re-read the target's data and put its real leaves in the map; the blocks now out of sync."""
    g_size = p.grain
    per = bs // g_size
    repair: list[int] = []
    jobs = _verify_jobs(dfd, leaves, size, bs, g_size)

    def first(job: _Job, buf: bytearray) -> _Work:
        return lambda: p.hash_file(dfd, job, buf)

    def finish(job: _Job, buf: bytearray, h: _Hashed) -> None:
        if job.read:
            p.target_read += job.length
        leaves.target.put(job.index * per, h.leaves)
        if h.leaves != job.old_source:
            repair.append(job.index)

    p.run(jobs, first, finish, HASH_WORKERS)
    return repair


def _verify_jobs(fd: int, leaves: Leaves, size: int, bs: int, g_size: int) -> Iterator[_Job]:
    """A job for every block holding data in fd or non-zero target leaves, with both sides' leaves."""
    data = _data_blocks(fd, 0, size, bs)
    next_data = next(data, None)
    for index, s, t in _block_leaves(leaves, size, bs, g_size):
        has_data = next_data is not None and next_data[0] == index
        if has_data:
            next_data = next(data, None)
        if has_data or t.count(0) != len(t) or s.count(0) != len(s):
            n = block_length(index, size, bs)
            yield _Job(index, index * bs, n, n if has_data else 0, old_source=s, old_target=t, read=has_data)


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
    _check_block_size(block_size)
    bs = block_size
    with _opened(path, os.O_RDONLY) as fd:
        size = os.fstat(fd).st_size
        p = _Pass(block_size=bs, src_fd=fd, progress=progress, progress_interval=progress_interval, cancel=cancel)
        tree = TreeDigest(size, p.grain)
        p.reporter.total = allocated_bytes(fd, 0, size)
        _fadvise(fd, os.POSIX_FADV_SEQUENTIAL)

        def first(job: _Job, buf: bytearray) -> _Work:
            return lambda: p.hash_file(fd, job, buf)

        def finish(job: _Job, buf: bytearray, h: _Hashed) -> None:
            tree.add(job.offset // p.grain, h.leaves)
            p.reporter.done += job.work

        jobs = (
            _Job(i, i * bs, block_length(i, size, bs), sum(b - a for a, b in segs))
            for i, segs in _data_blocks(fd, 0, size, bs)
        )
        p.run(jobs, first, finish, HASH_WORKERS)
    p.reporter.final()
    return tree.hexdigest()


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
    with _opened(dst, os.O_RDONLY) as fd:
        size = os.fstat(fd).st_size
        state = _load_state(state_dir, size, None)
        bs, g_size = state.block_size, state.grain
        p = _Pass(block_size=bs, src_fd=fd, progress=progress, progress_interval=progress_interval, cancel=cancel)
        tree = TreeDigest(size, g_size)
        _fadvise(fd, os.POSIX_FADV_SEQUENTIAL)
        with Leaves(state_dir, block_count(size, g_size), fresh=False) as leaves:
            p.reporter.total = sum(block_length(i, size, bs) for i, _ in _data_blocks(fd, 0, size, bs))

            def first(job: _Job, buf: bytearray) -> _Work:
                return lambda: p.hash_file(fd, job, buf)

            def finish(job: _Job, buf: bytearray, h: _Hashed) -> None:
                if h.leaves != job.old_target:
                    k = next(k for k in range(0, len(h.leaves), LEAF) if h.leaves[k : k + LEAF] != job.old_target[k : k + LEAF])
                    offset = job.offset + k // LEAF * g_size
                    expected = job.old_target[k : k + LEAF]
                    what = "holds data where the leaves say zeros" if expected == ZERO_LEAF else "content differs"
                    raise VerificationError(
                        f"{dst}: grain at offset {offset} ({g_size} bytes) does not match its leaf: {what}", offset
                    )
                tree.add(job.offset // g_size, h.leaves)
                p.reporter.done += job.work

            p.run(_verify_jobs(fd, leaves, size, bs, g_size), first, finish, HASH_WORKERS)
    p.reporter.final()
    return tree.hexdigest()


def target_untouched(dst: str, *, state_dir: str) -> bool:
    """Whether dst is as the engine's last pass left it (one fstat; no data read).

    False means someone wrote to (or truncated, or replaced) the production disk since: the next delta
    will re-read its data and repair it, and the portal should say so. See verify_changes for what
    the seal can and cannot see."""
    state = DiskState.load(state_dir)
    if state is None or state.target_seal is None:
        return False
    try:
        with _opened(dst, os.O_RDONLY) as fd:
            return state.same_target(fd) and fingerprint(fd) == state.target_seal
    except OSError:
        return False


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
      target was shown to hold before), and the target has not changed since: its seal still matches;
    - and ``samples`` random data grains of each side are re-read now and must match their leaves
      (a cheap check that the leaves and the seals are not lying; 2 x samples x 64 KiB of reads).

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

    Cost: reading the two leaf files (1/2048 of the disk's size each) and 2 x samples grains, plus a
    full re-read of a side only when its seal is broken. Raises VerificationError when a sample does
    not match its leaf.
    """
    started = time.monotonic()
    with _opened(src, os.O_RDONLY) as sfd, _opened(dst, os.O_RDONLY) as dfd:
        size = os.fstat(sfd).st_size
        state = _load_state(state_dir, size, None)
        if not state.same_target(dfd):
            raise TransferStateError(f"{dst} is not the file the full copy wrote")
        g_size = state.grain
        target_sealed = state.target_seal is not None and fingerprint(dfd) == state.target_seal
        source_sealed = state.source_seal is not None and fingerprint(sfd) == state.source_seal
        bytes_read = 0
        kwargs = {"progress": progress, "progress_interval": progress_interval, "cancel": cancel}
        with Leaves(state_dir, block_count(size, g_size), fresh=False) as leaves:
            if source_sealed:
                source_digest = leaves.source.digest(size, g_size)
            else:
                source_digest = disk_digest(src, state.block_size, **kwargs)  # type: ignore[arg-type]
                bytes_read += allocated_bytes(sfd, 0, size)
            if target_sealed:
                target_digest = leaves.target.digest(size, g_size)
            else:
                target_digest = disk_digest(dst, state.block_size, **kwargs)  # type: ignore[arg-type]
                bytes_read += allocated_bytes(dfd, 0, size)
            rng = random.SystemRandom()
            checked = 0
            for fd, side, sealed, name in ((sfd, leaves.source, source_sealed, src), (dfd, leaves.target, target_sealed, dst)):
                if not sealed or size == 0:
                    continue
                for _ in range(samples):
                    if cancel is not None and cancel.is_set():
                        raise TransferCancelled("transfer cancelled")
                    g = _sample_grain(fd, size, g_size, rng)
                    a = g * g_size
                    n = min(g_size, size - a)
                    data = bytearray(os.pread(fd, n, a))
                    bytes_read += n
                    checked += 1
                    if leaves_of(data, 0, len(data), g_size) != side.get(g, 1):
                        raise VerificationError(f"{name}: grain at offset {a} does not match its leaf (sampled)", a)
    return DiskProof(
        source_digest,
        target_digest,
        source_digest == target_digest,
        source_sealed,
        target_sealed,
        bytes_read,
        checked,
        time.monotonic() - started,
    )


def _sample_grain(fd: int, size: int, g_size: int, rng: random.SystemRandom) -> int:
    """A random grain, drawn among the file's data when it has some (a random offset, then SEEK_DATA)."""
    offset = rng.randrange(size)
    try:
        offset = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        with contextlib.suppress(OSError):
            offset = os.lseek(fd, 0, os.SEEK_DATA)
    return min(offset, size - 1) // g_size
