"""File-level helpers of the engine: opening, read-ahead hints, block sizes, where a file's data lies
block by block, and how a buffer cuts into grain runs and zero pages.

A disk is a file descriptor (a local file: direct mode) or an :class:`.nbd.NbdDisk` (an NBD export:
nbd mode); :func:`opened` picks by the path, and the few operations here (and in :mod:`.sparse`)
that touch a disk take either, so the passes do not care which."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence

from .nbd import NbdDisk, NbdError, is_nbd
from .sparse import data_extents, is_zero

Disk = int | NbdDisk

MAX_BLOCK_SIZE = 64 << 20
IO_CHUNK = 256 << 10  # pwrite size (larger writes can cost far more in the kernel: see docs/decisions.md)
PAGE = 4096
PROBE = 4096
ZERO_PAGE = bytes(PAGE)
NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


@contextlib.contextmanager
def opened(path: str, flags: int) -> Iterator[Disk]:
    """A file descriptor for a path, an NbdDisk for an NBD URI (writable unless flags are O_RDONLY;
    O_CREAT means nothing to an export, which must exist with the source's size)."""
    if is_nbd(path):
        disk = NbdDisk(path, writable=flags & os.O_ACCMODE != os.O_RDONLY)
        try:
            yield disk
        finally:
            disk.close()
        return
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def size_of(disk: Disk) -> int:
    return disk.size if isinstance(disk, NbdDisk) else os.fstat(disk).st_size


def resize(disk: Disk, size: int) -> None:
    """Make the target disk size bytes long (an NBD export cannot be resized: it must be that size)."""
    if isinstance(disk, NbdDisk):
        if disk.size != size:
            raise NbdError(f"{disk.name}: the export is {disk.size} bytes, the source {size}: create it that size")
        return
    os.ftruncate(disk, size)


def preadv(disk: Disk, view: memoryview, offset: int) -> int:
    if isinstance(disk, NbdDisk):
        return disk.preadv(view, offset)
    return os.preadv(disk, [view], offset)


def pread(disk: Disk, n: int, offset: int) -> bytes:
    return disk.pread(n, offset) if isinstance(disk, NbdDisk) else os.pread(disk, n, offset)


def pwrite(disk: Disk, data: memoryview, offset: int) -> int:
    return disk.pwrite(data, offset) if isinstance(disk, NbdDisk) else os.pwrite(disk, data, offset)


def flush(disk: Disk) -> None:
    """Make what was written durable (fdatasync, or NBD flush)."""
    if isinstance(disk, NbdDisk):
        disk.flush()
    else:
        os.fdatasync(disk)


def has_hole(disk: Disk, start: int, end: int) -> bool:
    """Whether the disk has a hole in [start, end) (True when it cannot say)."""
    if isinstance(disk, NbdDisk):
        return disk.has_hole(start, end)
    try:
        return os.lseek(disk, start, os.SEEK_HOLE) < end
    except OSError:
        return True


def next_data(disk: Disk, offset: int) -> int:
    """The first data offset at or after offset (offset itself when the disk cannot say; OSError
    ENXIO when no data follows)."""
    if isinstance(disk, NbdDisk):
        for a, _ in disk.data_extents(offset, disk.size):
            return a
        raise OSError(errno.ENXIO, "no data after the offset")
    return os.lseek(disk, offset, os.SEEK_DATA)


def fadvise(fd: Disk, advice: int) -> None:
    if isinstance(fd, NbdDisk):
        return
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, advice)


def check_block_size(block_size: int) -> None:
    if block_size < 4096 or block_size % 4096 or block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be a multiple of 4096 up to {MAX_BLOCK_SIZE}, not {block_size}")


def data_blocks(fd: Disk, start: int, end: int, bs: int) -> Iterator[tuple[int, tuple[tuple[int, int], ...]]]:
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


def grain_runs(grains: Sequence[int]) -> Iterator[tuple[int, int]]:
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


def zero_page_runs(buf: bytearray, a: int, b: int) -> list[tuple[int, int, bool]]:
    """buf[a:b] cut into runs, each flagged True when it is whole, aligned, all-zero pages (offsets
    in buf are aligned like the file: blocks start on a page). A range that ends inside a page ends at
    the disk's end (blocks, grains and extents end on pages elsewhere): that short last page is the
    disk's whole last page, flagged like any other. Left as data, a last page of zeros was written
    into a hole of the target (a property test found it: 57 bytes written, a block allocated)."""
    if b - a <= PAGE and not a % PAGE:  # one page, or the disk's short last page (most named runs)
        return [(a, b, is_zero(buf, a, b))]
    t0 = b - b % PAGE
    if t0 == b or t0 < a:
        return _page_runs(buf, a, b)
    runs = _page_runs(buf, a, t0) if t0 > a else []
    zero = is_zero(buf, t0, b)
    if runs and runs[-1][2] == zero:
        runs[-1] = (runs[-1][0], b, zero)
    else:
        runs.append((t0, b, zero))
    return runs


def _page_runs(buf: bytearray, a: int, b: int) -> list[tuple[int, int, bool]]:
    """zero_page_runs over whole pages (b is on a page, or the range is within one page).

    Only pages whose first byte is zero can be zero pages: each run of such pages (found with ``find``
    and ``lstrip`` over the pages' first bytes) is checked whole, and halved only when it is not all
    zeros, so data costs a call or two per run and so does a hole, whatever their length."""
    p0 = -(-a // PAGE) * PAGE
    if b - p0 < PAGE:
        return [(a, b, False)]
    firsts = bytes(buf[p0 : b - PAGE + 1 : PAGE])  # the first byte of every whole page
    k = firsts.find(0)
    if k < 0:
        return [(a, b, False)]
    zeros: list[tuple[int, int]] = []
    while k >= 0:
        end = len(firsts) - len(firsts[k:].lstrip(b"\0"))  # the pages from k to end start with zero
        _zero_pages(buf, p0 + k * PAGE, p0 + end * PAGE, zeros)
        k = firsts.find(0, end)
    runs: list[tuple[int, int, bool]] = []
    at = a  # buf[a:at] is in runs
    for x, y in zeros:
        if runs and runs[-1][2] and runs[-1][1] == x:  # continues the last zero run
            runs[-1] = (runs[-1][0], y, True)
            at = y
            continue
        if x > at:
            runs.append((at, x, False))
        runs.append((x, y, True))
        at = y
    if b > at:
        runs.append((at, b, False))
    return runs


def _zero_pages(buf: bytearray, x: int, y: int, out: list[tuple[int, int]]) -> None:
    """Append to out the all-zero page runs of buf[x:y] (whole pages), in order."""
    if is_zero(buf, x, y):
        out.append((x, y))
    elif y - x > PAGE:
        mid = x + (y - x) // PAGE // 2 * PAGE
        _zero_pages(buf, x, mid, out)
        _zero_pages(buf, mid, y, out)
