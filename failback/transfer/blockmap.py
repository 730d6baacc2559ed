"""What a target disk holds, kept on disk in the session's state directory.

Two files per disk:

``blocks.map``
    One 48-byte record per block: a seeded XXH3-128 of the block (16 bytes, cheap change detection)
    followed by its BLAKE3 (32 bytes, verification). An all-zero record means "this block is all
    zeros" — so the map file is created sparse and hole blocks cost neither time nor space. The map is
    read and written in place (pread/pwrite), never held in memory whole: memory does not grow with the
    disk.
``state.json``
    The checkpoint: disk size, block size, the XXH3 seed, the target file's identity, how far the full
    copy got (``position``: every block below it is in the target and in the map), whether it is
    complete, and the blocks of an interrupted tracked delta (``pending``). Replaced atomically.

The end-to-end digest of a disk is a BLAKE3 tree over the blocks::

    digest = BLAKE3( "failback-blocktree-v1\\0" || u64le(size) || u64le(block_size) || D0 || D1 || ... )
    Di     = BLAKE3(block i)      (the last block may be shorter; an all-zero block has a constant Di)

It can be recomputed from a file alone (:func:`failback.transfer.disk_digest`), and from the map
without reading the target. It depends on the block size, which is therefore part of its label:
``blake3-tree-4MiB:<hex>``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import struct
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import blake3

RECORD = 48
XXH_LEN = 16
ZERO_RECORD = bytes(RECORD)
STATE_FILE = "state.json"
MAP_FILE = "blocks.map"
VERSION = 1
_TREE_PREFIX = b"failback-blocktree-v1\0"
_CHUNK_RECORDS = 8192  # 384 KiB of map read at a time


@functools.lru_cache(maxsize=8)
def zero_block_digest(length: int) -> bytes:
    """BLAKE3 of ``length`` zero bytes: the Di of a hole or an all-zero block."""
    return blake3.blake3(bytes(length)).digest()


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def block_length(index: int, size: int, block_size: int) -> int:
    return min(block_size, size - index * block_size)


def digest_label(block_size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if block_size % (1 << shift) == 0:
            return f"blake3-tree-{block_size >> shift}{unit}"
    return f"blake3-tree-{block_size}B"


class TreeDigest:
    """Accumulates the per-block digests, in block order, into the end-to-end digest."""

    def __init__(self, size: int, block_size: int) -> None:
        self.size, self.block_size = size, block_size
        self.n_blocks = block_count(size, block_size)
        self.next_index = 0
        self._h = blake3.blake3(_TREE_PREFIX + struct.pack("<QQ", size, block_size))

    def add(self, index: int, strong: bytes | None) -> None:
        """Block ``index``'s BLAKE3, or None for an all-zero block. Skipped blocks count as zero."""
        self.add_zeros_until(index)
        self._h.update(strong if strong is not None else self._zero(index))
        self.next_index = index + 1

    def add_zeros_until(self, index: int) -> None:
        start = self.next_index
        if index <= start:
            return
        full_end = min(index, self.size // self.block_size)  # blocks of full length
        if full_end > start:
            zd = zero_block_digest(self.block_size)
            for lo in range(start, full_end, 4096):
                self._h.update(zd * (min(full_end, lo + 4096) - lo))
        for i in range(max(start, full_end), index):  # at most the short last block
            self._h.update(self._zero(i))
        self.next_index = index

    def _zero(self, index: int) -> bytes:
        return zero_block_digest(block_length(index, self.size, self.block_size))

    def hexdigest(self) -> str:
        self.add_zeros_until(self.n_blocks)
        return f"{digest_label(self.block_size)}:{self._h.hexdigest()}"


class BlockMap:
    """The records file, addressed by block index. Not thread-safe: one pass owns it."""

    def __init__(self, state_dir: str, n_blocks: int, *, fresh: bool) -> None:
        self.path = os.path.join(state_dir, MAP_FILE)
        self.n_blocks = n_blocks
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fresh:
            os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, n_blocks * RECORD)
        self._cache_start = -1
        self._cache = bytearray()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BlockMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, index: int) -> bytes:
        start = index - index % _CHUNK_RECORDS
        if start != self._cache_start:
            self._cache = bytearray(os.pread(self.fd, _CHUNK_RECORDS * RECORD, start * RECORD))
            self._cache_start = start
        rel = (index - start) * RECORD
        rec = bytes(self._cache[rel : rel + RECORD])
        return rec if len(rec) == RECORD else ZERO_RECORD

    def put(self, index: int, record: bytes) -> None:
        os.pwrite(self.fd, record, index * RECORD)
        rel = (index - self._cache_start) * RECORD
        if self._cache_start >= 0 and 0 <= rel < len(self._cache):
            self._cache[rel : rel + RECORD] = record

    def clear_from(self, index: int) -> None:
        """Forget every block from ``index`` on (they read as zero records again)."""
        os.ftruncate(self.fd, index * RECORD)
        os.ftruncate(self.fd, self.n_blocks * RECORD)
        self._cache_start = -1

    def records(self) -> Iterator[tuple[int, bytes]]:
        """(index, record) for every block, in order, streaming."""
        for start in range(0, self.n_blocks, _CHUNK_RECORDS):
            count = min(_CHUNK_RECORDS, self.n_blocks - start)
            data = os.pread(self.fd, count * RECORD, start * RECORD).ljust(count * RECORD, b"\0")
            for i in range(count):
                yield start + i, data[i * RECORD : (i + 1) * RECORD]

    def tree_digest(self, size: int, block_size: int) -> str:
        tree = TreeDigest(size, block_size)
        for index, rec in self.records():
            if rec != ZERO_RECORD:
                tree.add(index, rec[XXH_LEN:])
        return tree.hexdigest()

    def sync(self) -> None:
        os.fdatasync(self.fd)


@dataclass
class DiskState:
    size: int
    block_size: int
    seed: int
    dst_dev: int
    dst_ino: int
    position: int = 0
    complete: bool = False
    digest: str | None = None
    pending: list[int] = field(default_factory=list)
    version: int = VERSION

    @classmethod
    def new(cls, size: int, block_size: int, dst_fd: int) -> DiskState:
        st = os.fstat(dst_fd)
        return cls(size, block_size, random.SystemRandom().getrandbits(64), st.st_dev, st.st_ino)

    @classmethod
    def load(cls, state_dir: str) -> DiskState | None:
        """The saved state, or None if there is none or it is unreadable / of another version."""
        try:
            with open(os.path.join(state_dir, STATE_FILE), encoding="utf-8") as f:
                data = json.load(f)
            if data.get("version") != VERSION:
                return None
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None

    def same_target(self, dst_fd: int) -> bool:
        st = os.fstat(dst_fd)
        return (st.st_dev, st.st_ino) == (self.dst_dev, self.dst_ino)


_save_lock = threading.Lock()


def save_state(state_dir: str, state: DiskState, *, durable: bool) -> None:
    """Atomically replace state.json (fsync'd file and directory when durable)."""
    with _save_lock:
        data = json.dumps(asdict(state), separators=(",", ":")).encode()
        final = os.path.join(state_dir, STATE_FILE)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if durable:
            dfd = os.open(state_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
