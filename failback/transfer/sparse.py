"""Sparse-file primitives: where the data is, whether a buffer is all zero, how to punch a hole, and
how to replace a small file without freeing a block (exchanging two names).

Linux first (SEEK_DATA/SEEK_HOLE, fallocate(PUNCH_HOLE)), with plain fallbacks so the engine still
works, only less sparsely, on a filesystem or platform without them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

from .nbd import NbdDisk

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-glibc platform
    _libc = None
try:
    _renameat2 = _libc.renameat2 if _libc is not None else None
    if _renameat2 is not None:
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - glibc before 2.28
    _renameat2 = None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_exchange_supported = True

_punch_supported = True
_zero_buf = bytes(0)  # grows to the largest length asked; only ever read


def data_extents(fd: int | NbdDisk, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield (offset, end) of the data (non-hole) ranges of fd within [start, end), in order.

    Streams (two lseek calls per extent), so memory stays flat however fragmented the file is.
    Without SEEK_DATA support the whole range counts as data. An NBD export answers from block status.
    """
    if isinstance(fd, NbdDisk):
        yield from fd.data_extents(start, end)
        return
    off = start
    while off < end:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after off
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield off, end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        off = hole


def allocated_bytes(fd: int | NbdDisk, start: int, end: int) -> int:
    return sum(e - s for s, e in data_extents(fd, start, end))


def zero_bytes(n: int) -> memoryview:
    """n zero bytes (a view of a buffer that grows to the largest length asked; only ever read)."""
    global _zero_buf
    zero = _zero_buf
    if len(zero) < n:
        zero = _zero_buf = bytes(max(n, 64 << 10))
    return memoryview(zero)[:n]


def is_zero(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    """True if buf[start:end] is all zero bytes.

    ``bytearray.startswith`` against zeros is one memcmp (18 GB/s here) that keeps the GIL: a ctypes
    memcmp released it on every call, and retaking it behind a hashing thread cost 10 µs and more per
    4 KiB page, which made the per-page checks of a delta with many small changes its largest cost."""
    end = len(buf) if end is None else end
    n = end - start
    if n <= 0:
        return True
    if buf[start] or buf[end - 1]:
        return False
    return buf.startswith(zero_bytes(n), start)


def punch_hole(fd: int | NbdDisk, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) keeping the file size; it then reads as zeros.

    Returns False when the filesystem cannot punch holes (the caller writes zeros instead). On an NBD
    export: a write of zeros the server may deallocate (False when the export cannot zero).
    """
    global _punch_supported
    if length <= 0:
        return True
    if isinstance(fd, NbdDisk):
        return fd.zero(offset, length)
    if _libc is None or not _punch_supported:
        return False
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        _punch_supported = False
        return False
    raise OSError(err, os.strerror(err))


_allocate_supported = True


def allocate(fd: int, offset: int, length: int) -> bool:
    """Allocate [offset, offset+length) of a file ahead of writing it (``fallocate`` keeping the size;
    it reads as zeros until written). Only a hint for speed: False when the filesystem cannot, or has
    no room (the write that follows then fails as it would have); never emulated by writing zeros."""
    global _allocate_supported
    if length <= 0 or _libc is None or not _allocate_supported:
        return False
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        _allocate_supported = False
    return False


def exchange(a: str, b: str) -> bool:
    """Swap the names of two existing files, atomically (``renameat2(RENAME_EXCHANGE)``). False when
    either is missing or the filesystem or platform cannot, and then nothing changed."""
    global _exchange_supported
    if _renameat2 is None or not _exchange_supported:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        _exchange_supported = False
    return False


def zero_range(fd: int | NbdDisk, offset: int, length: int, chunk: int = 1 << 20) -> int:
    """Make [offset, offset+length) read as zeros: punch a hole, else write zeros. Returns bytes written."""
    if punch_hole(fd, offset, length):
        return 0
    zero = zero_bytes(min(chunk, length))
    written = 0
    while written < length:
        n = min(len(zero), length - written)
        if isinstance(fd, NbdDisk):
            written += fd.pwrite(zero[:n], offset + written)
        else:
            written += os.pwrite(fd, zero[:n], offset + written)
    return written
