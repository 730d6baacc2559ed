"""What a file allocates for its data, as the engine's allocation properties mean it.

``st_blocks`` also counts the blocks of ext4's extent tree: an inode holds four extents, and a file
that was ever in more pieces keeps a 4 KiB leaf block (ext4 does not fold the tree back when punches
join the pieces again). A target the deltas punched and rewrote is in more pieces than a source
written once, so it counted one block more with the same or less data (112 against 104 sectors, and
24 against 16, on 16 MiB images). The properties compare data, so this counts the file's extents as
FIEMAP reports them: written, unwritten (preallocated) and delayed alike, the tree's own blocks not
(no FIEMAP_FLAG_SYNC: forcing allocation would move st_blocks, and so the engine's seals).
"""

from __future__ import annotations

import fcntl
import os
import struct

FS_IOC_FIEMAP = 0xC020660B
_HEAD = struct.Struct("=QQIIII")  # start, length, flags, mapped extents, extent count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, reserved x2, flags, reserved x3


def _fiemap(fd: int, room: int) -> bytearray:
    req = bytearray(_HEAD.pack(0, 2**64 - 1, 0, 0, room, 0) + bytes(room * _EXTENT.size))
    fcntl.ioctl(fd, FS_IOC_FIEMAP, req)
    return req


def data_sectors(path: str) -> int:
    """512-byte sectors of the file's extents, as st_blocks would count them without the extent tree."""
    fd = os.open(path, os.O_RDONLY)
    try:
        count = _HEAD.unpack_from(_fiemap(fd, 0))[3]  # with no room given, FIEMAP only counts
        req = _fiemap(fd, count + 16)
        mapped = _HEAD.unpack_from(req)[3]
        total = sum(_EXTENT.unpack_from(req, _HEAD.size + k * _EXTENT.size)[2] for k in range(mapped))
        return total // 512
    finally:
        os.close(fd)
