"""What both disks hold, kept in the session's state directory: leaf digests, the hash tree, the seal.

A disk is cut into **grains** (64 KiB; the last one may be shorter). Each grain has a **leaf**: the
XXH3-128 of its bytes (16 bytes, xxHash's canonical big-endian form), or 16 zero bytes when the grain is
all zeros (holes and zero grains cost nothing: the leaf files are sparse). Every NODE_LEAVES (4,096)
leaves, 256 MiB of disk, have a **node**: the XXH3-128 of those leaves, or 16 zero bytes when they are
all zero leaves. Files per disk:

``source.leaves``
    The leaf of every grain of the **replica** as the engine last read it.
``target.leaves``
    The leaf of every grain of the **production disk** as the engine last read it back (or, in phase 1,
    as it wrote it from the bytes it read back or from the buffer it wrote).
``source.nodes``, ``target.nodes``
    Each side's nodes as of the last digest: a cache, so that a pass computes again only the nodes over
    the leaves it moves. A pass trusts it only while the leaves seal (below) holds and the root over the
    kept nodes is the digest recorded with that seal; else it computes every node from the leaves.
``state.json``
    The checkpoint: disk size, block size (the I/O unit, a multiple of the grain), grain, the target
    file's identity, how far the full copy got (``position``), whether it is complete, both disk
    digests, the blocks of an interrupted tracked delta (``pending``), and the **seals**: a fingerprint
    of each file (size, allocated blocks, mtime, ctime) taken when the last pass finished, and one of
    the two leaf files (inode, size, mtime, ctime) as the digests were computed from them. Replaced
    atomically.

The disk digest is a hash tree of height three, independent of the block size::

    digest = XXH3-128( "failback-leaftree-v5\\0" || u64le(size) || u64le(grain) || N0 || N1 || ... )
    Nj     = XXH3-128(L[4096 j] || ... || L[4096 j + 4095]), or 16 zero bytes if those are all zero
    Li     = XXH3-128(grain i), or 16 zero bytes for an all-zero grain

A leaves file *is* ``L0 || L1 || ...``, so a node is one XXH3-128 over 64 KiB of it, and a digest after
a pass costs the nodes that pass moved plus one XXH3-128 over the nodes (1/16,777,216 of the disk):
the switch window does not grow with the disk. :func:`failback.transfer.disk_digest` recomputes it from
a file alone: anyone holding the disk can check the audit trail's figure. Label:
``xxh3-tree3-64KiB:<hex>`` (32 hex digits).

The leaves and the root are a checksum, not a cryptographic hash: XXH3-128 catches accidental corruption
and copy errors (any changed grain changes its leaf but with probability 2^-128, and its 2^64 birthday
bound is far above a disk's grain count), at 40 GB/s on one core where BLAKE3 made 5 GB/s. It does not
resist a collision crafted on purpose; who could craft one, and what it would and would not achieve, is
in docs/decisions.md ("what the switch proves"). In state version 4 the root was straight over the
leaves (``xxh3-tree2-64KiB:``, prefix ``-v4``), which made every digest hash 1/4096 of the disk. In
state version 3 it was BLAKE3
(``xxh3-tree-64KiB:``, 64 hex digits): it cost 1.3 ms per digest on 16 GiB, four per switch window, and
proved nothing more, since the leaves under it are XXH3. A version 3 or 4 state directory is read with
its digests recomputed from its leaves (the leaves did not change), so a session in progress is not
copied again.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import xxhash

from .nbd import NbdDisk
from .sparse import exchange, is_zero

GRAIN = 64 << 10
LEAF = 16
ZERO_LEAF = bytes(LEAF)
STATE_FILE = "state.json"
SOURCE_LEAVES = "source.leaves"
TARGET_LEAVES = "target.leaves"
SOURCE_NODES = "source.nodes"
TARGET_NODES = "target.nodes"
NODE_LEAVES = 4096  # leaves under one node: 64 KiB of leaves, 256 MiB of disk at 64 KiB grains
VERSION = 5
# 4: the root straight over the leaves, 3: a BLAKE3 root (their digests are recomputed); 2: BLAKE3 leaves (absent)
READABLE_VERSIONS = (3, 4, 5)
_TREE_PREFIX = b"failback-leaftree-v5\0"
LABEL = "xxh3-tree3"


def leaf_of(data: memoryview | bytes | bytearray) -> bytes:
    """The leaf of a grain that is not all zeros (the caller checks for zeros)."""
    return xxhash.xxh3_128_digest(data)


def node_of(leaves: bytes | bytearray) -> bytes:
    """The node over a run of leaves (NODE_LEAVES of them, fewer for the last node): 16 zero bytes when
    they are all zero leaves (a node of holes costs nothing, like a leaf of one), else their XXH3-128."""
    return ZERO_LEAF if is_zero(leaves) else xxhash.xxh3_128_digest(leaves)


def grain_for(block_size: int) -> int:
    """The grain used with a block size: 64 KiB, or less when the block is not a multiple of it."""
    return math.gcd(block_size, GRAIN)


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def block_length(index: int, size: int, block_size: int) -> int:
    return min(block_size, size - index * block_size)


def digest_label(grain: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if grain % (1 << shift) == 0:
            return f"{LABEL}-{grain >> shift}{unit}"
    return f"{LABEL}-{grain}B"


def leaves_of(buf: bytearray, start: int, end: int, grain: int) -> bytes:
    """The leaves of buf[start:end], cut in grains from ``start`` (the last one may be shorter)."""
    view = memoryview(buf)
    out = []
    for a in range(start, end, grain):
        b = min(a + grain, end)
        out.append(ZERO_LEAF if is_zero(buf, a, b) else leaf_of(view[a:b]))
    return b"".join(out)


class TreeDigest:
    """Accumulates leaves in grain order into the disk digest; grains never added count as zero."""

    def __init__(self, size: int, grain: int) -> None:
        self.size, self.grain = size, grain
        self.n_grains = block_count(size, grain)
        self.next_grain = 0
        self._h = _root(size, grain)
        self._node = bytearray()  # the leaves of the node being filled

    def add(self, first_grain: int, leaves: bytes) -> None:
        if first_grain < self.next_grain:
            raise ValueError("leaves must be added in grain order")
        self._zeros(first_grain - self.next_grain)
        self._leaves(leaves)
        self.next_grain = first_grain + len(leaves) // LEAF

    def _leaves(self, leaves: bytes) -> None:
        full, at = NODE_LEAVES * LEAF, 0
        while at < len(leaves):
            take = full - len(self._node)
            self._node += leaves[at : at + take]
            at += take
            if len(self._node) == full:
                self._h.update(node_of(self._node))
                self._node.clear()

    def _zeros(self, count: int) -> None:
        if count > 0 and self._node:  # the rest of the node being filled
            n = min(count, NODE_LEAVES - len(self._node) // LEAF)
            self._leaves(bytes(n * LEAF))
            count -= n
        whole, rest = divmod(count, NODE_LEAVES)
        while whole > 0:  # whole nodes of zero leaves: zero nodes
            n = min(whole, 65536)
            self._h.update(bytes(n * LEAF))
            whole -= n
        if rest:
            self._leaves(bytes(rest * LEAF))

    def hexdigest(self) -> str:
        self._zeros(self.n_grains - self.next_grain)
        self.next_grain = self.n_grains
        if self._node:
            self._h.update(node_of(self._node))
            self._node.clear()
        return f"{digest_label(self.grain)}:{self._h.hexdigest()}"


def _root(size: int, grain: int) -> xxhash.xxh3_128:
    """The root hash of a disk's digest, before its leaves."""
    return xxhash.xxh3_128(_TREE_PREFIX + struct.pack("<QQ", size, grain))


def nodes_of_file(fd: int, n_grains: int, nodes: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(index, node) of the given nodes (default: all) of a leaves file (holes read as zero leaves)."""
    for i in range(block_count(n_grains, NODE_LEAVES)) if nodes is None else nodes:
        count = min(NODE_LEAVES, n_grains - i * NODE_LEAVES)
        yield i, node_of(os.pread(fd, count * LEAF, i * NODE_LEAVES * LEAF).ljust(count * LEAF, b"\0"))


def all_nodes(fd: int, n_grains: int) -> bytes:
    """Every node of a leaves file, computed from its leaves."""
    return b"".join(n for _, n in nodes_of_file(fd, n_grains))


def root_digest(nodes: bytes, size: int, grain: int) -> str:
    h = _root(size, grain)
    h.update(nodes)
    return f"{digest_label(grain)}:{h.hexdigest()}"


def leaves_digest(fd: int, size: int, grain: int) -> str:
    """The disk digest over a leaves file (``L0 || L1 || ...``, holes read as zero leaves)."""
    return root_digest(all_nodes(fd, block_count(size, grain)), size, grain)


class LeafFile:
    """One side's leaves, addressed by grain. Read and written in place (pread/pwrite), never held in
    memory whole, so memory does not grow with the disk. Not thread-safe: one pass owns it."""

    def __init__(self, path: str, nodes_path: str, n_grains: int, *, fresh: bool) -> None:
        self.path = path
        self.n_grains = n_grains
        self.n_nodes = block_count(n_grains, NODE_LEAVES)
        self.fd = self.nodes_fd = -1
        self.fd = _sized(path, n_grains * LEAF, fresh)
        self.nodes_fd = _sized(nodes_path, self.n_nodes * LEAF, fresh)
        # The nodes that no longer match the leaves; None: the nodes file is not known to match them at
        # all (a new or unsealed state), so the next digest computes every node.
        self.dirty: set[int] | None = None

    def close(self) -> None:
        for name in ("fd", "nodes_fd"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)

    def __enter__(self) -> LeafFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, first: int, count: int) -> bytes:
        data = os.pread(self.fd, count * LEAF, first * LEAF)
        return data.ljust(count * LEAF, b"\0")

    def put(self, first: int, leaves: bytes) -> None:
        if leaves:
            os.pwrite(self.fd, leaves, first * LEAF)
            if self.dirty is not None:
                last = first + len(leaves) // LEAF - 1
                self.dirty.update(range(first // NODE_LEAVES, last // NODE_LEAVES + 1))

    def clear_from(self, grain: int) -> None:
        """Forget every grain from ``grain`` on (they read as zero leaves again)."""
        os.ftruncate(self.fd, grain * LEAF)
        os.ftruncate(self.fd, self.n_grains * LEAF)
        if self.dirty is not None:
            self.dirty.update(range(grain // NODE_LEAVES, self.n_nodes))

    def chunks(self, chunk_grains: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
        """(first grain, leaves) over the whole file, streaming."""
        for first in range(0, self.n_grains, chunk_grains):
            yield first, self.get(first, min(chunk_grains, self.n_grains - first))

    def digest(self, size: int, grain: int, *, keep_nodes: bool = True) -> str:
        """The disk digest of what this side's leaves say: the nodes that changed since they last matched
        the leaves are computed again (all of them when that is not known), the root over all nodes.
        keep_nodes: write the new nodes to the nodes file (a pass; a verification only reads)."""
        if self.dirty is None:
            nodes = bytearray(all_nodes(self.fd, self.n_grains))
            if keep_nodes:
                os.pwrite(self.nodes_fd, nodes, 0)
        else:
            nodes = self.kept_nodes()
            for i, node in nodes_of_file(self.fd, self.n_grains, sorted(self.dirty)):
                nodes[i * LEAF : (i + 1) * LEAF] = node
                if keep_nodes:
                    os.pwrite(self.nodes_fd, node, i * LEAF)
        if keep_nodes:
            self.dirty = set()
        return root_digest(nodes, size, grain)

    def kept_nodes(self) -> bytearray:
        return bytearray(os.pread(self.nodes_fd, self.n_nodes * LEAF, 0).ljust(self.n_nodes * LEAF, b"\0"))

    def trust_nodes(self, digest: str | None, size: int, grain: int) -> None:
        """Take the kept nodes as those of the leaves when their root is ``digest`` (the caller knows the
        leaves have not moved since that digest was computed): only the nodes over leaves moved from
        now on are computed again. A nodes file that is stale, torn by a crash or written by anyone else
        has another root, and every node is computed again."""
        if digest is not None and root_digest(self.kept_nodes(), size, grain) == digest:
            self.dirty = set()

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def fingerprint(self) -> list[int]:
        st = os.fstat(self.fd)
        return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _sized(path: str, length: int, fresh: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if fresh and os.fstat(fd).st_size:  # not a new file: ext4 flushes a file cut to 0 when it is closed
        os.ftruncate(fd, 0)
    if fresh or os.fstat(fd).st_size != length:  # ftruncate stamps mtime even to the same size
        os.ftruncate(fd, length)
    return fd


class Leaves:
    """Both sides' leaf files of one disk."""

    def __init__(self, state_dir: str, n_grains: int, *, fresh: bool) -> None:
        join = os.path.join
        self.source = LeafFile(join(state_dir, SOURCE_LEAVES), join(state_dir, SOURCE_NODES), n_grains, fresh=fresh)
        self.target = LeafFile(join(state_dir, TARGET_LEAVES), join(state_dir, TARGET_NODES), n_grains, fresh=fresh)

    def __enter__(self) -> Leaves:
        return self

    def __exit__(self, *exc: object) -> None:
        self.source.close()
        self.target.close()

    def sync(self) -> None:
        self.source.sync()
        self.target.sync()

    def clear_from(self, grain: int) -> None:
        self.source.clear_from(grain)
        self.target.clear_from(grain)

    def fingerprint(self) -> list[int]:
        """Both leaf files' (inode, size, mtime, ctime): the leaves seal."""
        return self.source.fingerprint() + self.target.fingerprint()

    def trust_nodes(self, state: DiskState) -> None:
        """A pass starting: when the leaves seal of the last pass still holds, the leaves are those its
        digests were computed from, and each side's kept nodes are trusted if their root is that digest."""
        if state.leaves_seal is not None and state.leaves_seal == self.fingerprint():
            self.source.trust_nodes(state.source_digest, state.size, state.grain)
            self.target.trust_nodes(state.digest, state.size, state.grain)

    @staticmethod
    def exist(state_dir: str, n_grains: int) -> bool:
        paths = (os.path.join(state_dir, SOURCE_LEAVES), os.path.join(state_dir, TARGET_LEAVES))
        return all(os.path.exists(p) and os.path.getsize(p) == n_grains * LEAF for p in paths)


# --------------------------------------------------------------------------------------------------
# Seals: has anyone but the engine written to a file since the engine last finished with it?

_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # Linux's value; file timestamps come from it


def fingerprint(fd: int | NbdDisk) -> list[int]:
    if isinstance(fd, NbdDisk):
        return fd.fingerprint()
    st = os.fstat(fd)
    return [st.st_size, st.st_blocks, st.st_mtime_ns, st.st_ctime_ns]


def seal(fd: int | NbdDisk, max_wait: float = 0.05, *, with_files: tuple[int, ...] = ()) -> list[int]:
    """The file's fingerprint, taken so that any later write to it (or to ``with_files``, other files
    sealed with it) changes their fingerprints: once the coarse clock has moved past their timestamps,
    except those of files whose filesystem stamps a write that follows a stat with a finer time
    (fine_stamps) and of an NBD export.

    Linux stamps a write with the coarse clock (one tick, 1-10 ms). A write in the same tick as the
    engine's last one would leave mtime and ctime unchanged; waiting for the next tick (at most a few
    ms) makes any later write show. ctime cannot be set back by a user (utime sets it to now)."""
    fp = fingerprint(fd)
    stamp = max(_coarse_stamp(f) for f in (fd, *with_files))
    deadline = time.monotonic() + max_wait
    while time.clock_gettime_ns(_COARSE) <= stamp and time.monotonic() < deadline:
        time.sleep(0.001)
    return fp


def _coarse_stamp(fd: int | NbdDisk) -> int:
    """The latest timestamp of fd a seal must wait past (0: none, its later writes show anyway)."""
    if isinstance(fd, NbdDisk) or fine_stamps(_directory_of(fd)):
        return 0
    st = os.fstat(fd)
    return max(st.st_mtime_ns, st.st_ctime_ns)


_fine: dict[int, bool] = {}
_fine_lock = threading.Lock()


def fine_stamps(directory: str | None) -> bool:
    """Whether files in ``directory`` get multigrain timestamps (Linux 6.13 on: ext4, xfs, btrfs,
    tmpfs): once a file's ctime has been read (fstat), its next write is stamped with a fine-grained
    time later than the one read, even within the same tick of the coarse clock, so the fingerprint
    a seal takes already changes with any later write and the seal need not wait for the tick (2 ms
    on average at 250 Hz, in every pass and in the switch window).

    Probed once per filesystem, on an anonymous file in the directory (O_TMPFILE: nothing is left
    behind): write, fstat, write again in the same coarse tick; fine when the second write's ctime and
    mtime are later. False when it cannot be probed (no such directory, no O_TMPFILE), so the seal
    waits as before."""
    if directory is None:
        return False
    try:
        dev = os.stat(directory).st_dev
    except OSError:
        return False
    with _fine_lock:
        if dev not in _fine:
            _fine[dev] = _probe_fine(directory)
        return _fine[dev]


def _probe_fine(directory: str) -> bool:
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):
        return False
    try:
        for _ in range(20):  # tries whose two writes fell in the same tick decide
            tick = time.clock_gettime_ns(_COARSE)
            os.pwrite(fd, b"a", 0)
            a = os.fstat(fd)
            os.pwrite(fd, b"b", 0)
            b = os.fstat(fd)
            if time.clock_gettime_ns(_COARSE) == tick:
                return b.st_mtime_ns > a.st_mtime_ns and b.st_ctime_ns > a.st_ctime_ns
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def _directory_of(fd: int) -> str | None:
    """The directory holding the open file ``fd`` (None when it was unlinked or is not a path)."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return os.path.dirname(path) if path.startswith("/") and not path.endswith(" (deleted)") else None


@dataclass
class DiskState:
    size: int
    block_size: int
    grain: int
    dst_dev: int
    dst_ino: int
    position: int = 0
    complete: bool = False
    digest: str | None = None  # target side
    source_digest: str | None = None
    pending: list[list[int]] = field(default_factory=list)
    target_seal: list[int] | None = None
    source_seal: list[int] | None = None
    leaves_seal: list[int] | None = None  # both leaf files as the digests above were computed from them
    version: int = VERSION

    @classmethod
    def new(cls, size: int, block_size: int, dst_fd: int | NbdDisk) -> DiskState:
        return cls(size, block_size, grain_for(block_size), *_identity(dst_fd))

    @classmethod
    def load(cls, state_dir: str) -> DiskState | None:
        """The saved state, or None if there is none or it is unreadable / of another version."""
        try:
            with open(os.path.join(state_dir, STATE_FILE), encoding="utf-8") as f:
                data = json.load(f)
            if data.get("version") not in READABLE_VERSIONS:
                return None
            if data["version"] != VERSION:
                _recompute_digests(state_dir, data)
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None

    def same_target(self, dst_fd: int | NbdDisk) -> bool:
        return _identity(dst_fd) == (self.dst_dev, self.dst_ino)


def _recompute_digests(state_dir: str, data: dict) -> None:
    """An older state's digests, recomputed from its leaves under this version's root (the leaves are
    the same): a side whose leaves file is missing or of another size keeps no digest."""
    length = block_count(data["size"], data["grain"]) * LEAF
    for key, name in (("digest", TARGET_LEAVES), ("source_digest", SOURCE_LEAVES)):
        path = os.path.join(state_dir, name)
        if data.get(key) is None:
            continue
        if not os.path.exists(path) or os.path.getsize(path) != length:
            data[key] = None
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data[key] = leaves_digest(fd, data["size"], data["grain"])
        finally:
            os.close(fd)
    data["version"] = VERSION


def _identity(fd: int | NbdDisk) -> tuple[int, int]:
    """(device, inode) of a file; an NBD export's stand-in for them."""
    if isinstance(fd, NbdDisk):
        return fd.identity()
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


_save_lock = threading.Lock()


def save_state(state_dir: str, state: DiskState, *, durable: bool) -> None:
    """Atomically replace state.json (fsync'd file and directory when durable): written over the state
    before it, kept as state.json.tmp, then the two names exchanged. A new file renamed over the old one
    freed the old one's block, and on ext4 mounted ``discard`` the rename waited for that discard behind
    the device's write-back, and for the new file's own write-back (ext4's ``auto_da_alloc``): 0.1-0.3 s
    each time phase 1 of a 4 GiB disk saved, against a copy of 1.2 s (docs/decisions.md, issue 13).
    Where names cannot be exchanged, a new file is renamed over the old one. When durable, the directory
    is synced before state.json.tmp is written over too: the exchange that named it so may not be on
    disk yet (a save that was not durable), and a power loss must not find the file being written as
    state.json."""
    with _save_lock:
        data = json.dumps(asdict(state), separators=(",", ":")).encode()
        final = os.path.join(state_dir, STATE_FILE)
        tmp = final + ".tmp"
        if durable and os.path.exists(tmp):
            _sync_dir(state_dir)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
            if os.fstat(fd).st_size > len(data):
                os.ftruncate(fd, len(data))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if not exchange(tmp, final):
            os.replace(tmp, final)
        if durable:
            _sync_dir(state_dir)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
