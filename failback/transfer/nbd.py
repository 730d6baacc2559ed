"""Disks reached as NBD exports, through libnbd (Debian's ``python3-libnbd``): the engine's third way
to a disk, beside a local file (direct) and the datastore's HTTP interface (network, in the jobs).

An NBD URI (``nbd://host:port/export``, ``nbds://…`` for TLS, ``nbd+unix:///export?socket=/path``,
``nbds+unix://…``; libnbd's own query parameters such as ``tls-certificates=DIR`` pass through) opens
an :class:`NbdDisk`, which offers the file operations the engine uses: ranged reads and writes, zeroing
that lets the server punch a hole (NBD_CMD_WRITE_ZEROES without NO_HOLE: nbdkit's ``file`` plugin and
``vddk`` both deallocate), where the data lies (block status, ``base:allocation``), and flush.

The pool reads in parallel, so each thread gets its own connection to the export (a libnbd handle
serialises its requests); writes go through the calling thread's. What NBD cannot give, and what
the engine does instead, is told in docs/decisions.md ("The NBD transport"): there is no inode (the
target's identity is the export's name and its size), and no timestamps, so an NBD
disk's seal is its size only — a write to the production disk behind the engine's back is not seen
by the seal, only by the sampled grains of the proof or a full verify_target.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")
MAX_REQUEST = 32 << 20  # NBD servers refuse larger requests (libnbd caps at 64 MiB)
READ_REQUEST = 1 << 20  # a read is cut into requests of this size, all in flight (nbdkit serves them on its threads)
SEND_BUFFER = 4 << 20  # a Unix socket's send buffer asked for (see _widen_send_buffer)
STATUS_SPAN = 1 << 30  # block status asked for at most this much at a time
STATUS_FIRST = 64 << 20  # ... and this much at a new place: each request that goes on from the last asks twice as much
MISSING = (
    "the NBD transport needs libnbd's Python binding, which is not importable from this Python: "
    "install Debian's python3-libnbd (apt-get install python3-libnbd) and link it into the venv with "
    "`sh tests/nbd_venv.sh .venv` (make test does both); see README, 'The NBD transport'"
)


class NbdError(OSError):
    """An NBD export could not be reached or refused a request; the message names the export."""


def is_nbd(path: str) -> bool:
    return isinstance(path, str) and path.startswith(SCHEMES)


def libnbd() -> Any:
    """The ``nbd`` module, or NbdError saying how to install it."""
    try:
        import nbd  # noqa: PLC0415 - optional: only the nbd transport needs it
    except ImportError as exc:
        raise NbdError(MISSING) from exc
    return nbd


def redacted(uri: str) -> str:
    """The URI without its query (which may name key files): for messages and identity."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _shutdown(h: Any) -> None:
    try:
        h.shutdown()
    except Exception:  # the server went away: nothing left to close politely
        pass
    # libnbd closes a handle when Python frees it (this binding has no close())


class _Pool:
    """Idle connections per URI, at most ``LIMIT`` in all (the oldest closed first). A connection is
    reused only if it is idle and still connected: a server that went away shows as end of file on a
    poll that does not wait, and the connection is dropped."""

    LIMIT = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[tuple[str, Any]] = []

    def take(self, uri: str) -> Any | None:
        while True:
            with self._lock:
                k = next((i for i in range(len(self._idle) - 1, -1, -1) if self._idle[i][0] == uri), None)
                if k is None:
                    return None
                h = self._idle.pop(k)[1]
            if _alive(h):
                return h
            _shutdown(h)

    def give(self, uri: str, h: Any) -> None:
        if not _alive(h):
            _shutdown(h)
            return
        with self._lock:
            self._idle.append((uri, h))
            old = self._idle[: max(0, len(self._idle) - self.LIMIT)]
            del self._idle[: len(old)]
        for _, stale in old:
            _shutdown(stale)

    def release(self, uri: str) -> None:
        with self._lock:
            gone = [h for u, h in self._idle if u == uri]
            self._idle = [(u, h) for u, h in self._idle if u != uri]
        for h in gone:
            _shutdown(h)


def _alive(h: Any) -> bool:
    try:
        if h.aio_is_ready():
            h.poll(0)  # reads an end of file (a server gone) without waiting
        return bool(h.aio_is_ready()) and h.aio_in_flight() == 0
    except Exception:
        return False


_POOL = _Pool()


def _widen_send_buffer(h: Any) -> None:
    """Let a Unix socket hold SEND_BUFFER of our writes in flight instead of the default 208 KiB (the
    kernel caps it at net.core.wmem_max): on a Unix socket the sender's buffer is all the stream
    holds, and each time it fills both ends wait and wake, per 208 KiB of data. TCP sockets are left
    alone: fixing their buffer would switch off the kernel's own sizing."""
    try:
        fd = h.aio_get_fd()
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family == socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except Exception:  # noqa: BLE001 - a socket we cannot tune still works
        pass


def release(uri: str) -> None:
    """Close the idle connections to an export (its server is about to stop)."""
    _POOL.release(uri)


class Flight:
    """Requests in flight on one connection (:meth:`NbdDisk.start_reads`, :meth:`NbdDisk.start_writes`);
    ``wait`` once."""

    def __init__(
        self,
        disk: NbdDisk,
        h: Any,
        first: int,
        cookies: list[tuple[int, int]],
        failed: Exception | None = None,
        what: str = "read",
    ) -> None:
        self.disk, self.h, self.first, self.cookies, self.failed, self.what = disk, h, first, cookies, failed, what

    def wait(self) -> None:
        """Until every request is done; then NbdError if one failed (or asking for them did)."""
        self.disk._settle(self.h, self.what, self.first, self.cookies, self.failed)


class NbdDisk:
    """One NBD export, opened read-only or for writing. Thread-safe: a connection per thread."""

    def __init__(self, uri: str, *, writable: bool) -> None:
        self.uri = uri
        self.name = redacted(uri)
        self.writable = writable
        self._nbd = libnbd()
        self._local = threading.local()
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self._known: list[tuple[int, int, bool]] = []  # a read-only export's last block status answer
        self._span = STATUS_FIRST  # what the last request asked for
        main = self._handle()
        self.size: int = main.get_size()
        self.can_zero = bool(main.can_zero())
        self.can_flush = bool(main.can_flush())
        self.has_status = bool(main.can_meta_context("base:allocation"))
        if writable and main.is_read_only():
            self.close()
            raise NbdError(f"{self.name}: the export is read-only, and the engine must write to it")

    # ---- connections

    def _connect(self) -> Any:
        h = _POOL.take(self.uri)
        if h is not None:
            return h
        nbd = self._nbd
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.set_uri_allow_local_file(True)  # the URI comes from the portal's settings: its key files are ours
        h.set_pread_initialize(False)  # reads land in the engine's buffers, which a failed read never leaves
        try:
            h.connect_uri(self.uri)
        except nbd.Error as exc:
            raise NbdError(f"{self.name}: cannot connect to the NBD export: {exc}") from exc
        _widen_send_buffer(h)
        return h

    def _handle(self) -> Any:
        h = getattr(self._local, "h", None)
        if h is None:
            h = self._local.h = self._connect()
            with self._lock:
                self._handles.append(h)
        return h

    def close(self) -> None:
        """Give the connections back to the pool (a later pass on this export reuses them: a connection
        costs 9 ms on a Unix socket and 30 ms with TLS here, more than a small delta's data)."""
        with self._lock:
            handles, self._handles = self._handles, []
        for h in handles:
            _POOL.give(self.uri, h)
        self._local = threading.local()

    def _fail(self, what: str, offset: int, exc: Exception) -> NbdError:
        return NbdError(f"{self.name}: NBD {what} at offset {offset} failed: {exc}")

    # ---- the file operations the engine uses

    def preadv(self, view: memoryview, offset: int) -> int:
        """Fill view with the bytes at offset (a short read only at the end of the export). The
        server's data lands in view itself (no bytes object per request, no copy), in requests of
        READ_REQUEST all in flight at once."""
        n = min(len(view), max(0, self.size - offset))
        h, cookies = self._handle(), []
        try:
            for a in range(0, n, READ_REQUEST):
                b = min(n, a + READ_REQUEST)
                cookies.append((h.aio_pread(view[a:b], offset + a), offset + a))
        except self._nbd.Error as exc:
            self._settle(h, "read", offset, cookies, exc)
        self._settle(h, "read", offset, cookies)
        return n

    def pread(self, n: int, offset: int) -> bytes:
        buf = bytearray(min(n, max(0, self.size - offset)))
        self.preadv(memoryview(buf), offset)
        return bytes(buf)

    def pread_many(self, ranges: list[tuple[int, int]]) -> list[bytearray]:
        """The bytes of each (offset, length) (short only at the end of the export), all requests in
        flight at once: one round trip for the lot, not one per range."""
        bufs = [bytearray(min(n, max(0, self.size - off))) for off, n in ranges]
        flights = [
            self.start_reads(memoryview(b), off, [(0, len(b), 0)]) for (off, _), b in zip(ranges, bufs, strict=True)
        ]
        for flight in flights:  # one connection: the first wait lands them all, then each says how it went
            flight.wait()
        return bufs

    def start_reads(self, view: memoryview, base: int, runs: list[tuple[int, int, int]]) -> Flight:
        """Ask for [base+x, base+y) into view[q : q+y-x] for each (x, y, q), and return at once: the
        caller asks another export meanwhile, then waits for this Flight (a read of the replica and of
        the production disk then cost one round trip together, not two). The view must stay as it is
        until then."""
        h, cookies = self._handle(), []
        first = base + runs[0][0] if runs else base
        try:
            for x, y, q in runs:
                for a in range(x, y, READ_REQUEST):
                    b = min(y, a + READ_REQUEST)
                    cookies.append((h.aio_pread(view[q + a - x : q + b - x], base + a), base + a))
        except self._nbd.Error as exc:
            return Flight(self, h, first, cookies, exc)
        return Flight(self, h, first, cookies)

    def start_writes(self, writes: list[tuple[int, bytes]], zeros: list[tuple[int, int]]) -> Flight:
        """Ask for each (offset, data) to be written and each (offset, length) zeroed (the server may
        deallocate it), and return at once; the data must not change until the Flight is waited for."""
        h, cookies = self._handle(), []
        first = writes[0][0] if writes else zeros[0][0] if zeros else 0
        try:
            for off, data in writes:
                view = memoryview(data)
                for a in range(0, len(view), MAX_REQUEST):
                    cookies.append((h.aio_pwrite(view[a : a + MAX_REQUEST], off + a), off + a))
            for off, n in zeros:
                for a in range(0, n, 1 << 30):
                    cookies.append((h.aio_zero(min(1 << 30, n - a), off + a), off + a))
        except self._nbd.Error as exc:
            return Flight(self, h, first, cookies, exc, "write")
        return Flight(self, h, first, cookies, what="write")

    def pwrite(self, data: memoryview | bytes, offset: int) -> int:
        h, view, done = self._handle(), memoryview(data), 0
        while done < len(view):
            k = min(MAX_REQUEST, len(view) - done)
            try:
                h.pwrite(view[done : done + k], offset + done)
            except self._nbd.Error as exc:
                raise self._fail("write", offset + done, exc) from exc
            done += k
        return len(view)

    def pwrite_many(self, view: memoryview, base: int, runs: list[tuple[int, int]]) -> int:
        """Write view[x:y] at base+x for each run, all requests in flight at once (one round trip for
        the lot, not one per run); returns the bytes written. The view must not change meanwhile."""
        h, cookies, total, first = self._handle(), [], 0, base + (runs[0][0] if runs else 0)
        try:
            for x, y in runs:
                for a in range(x, y, MAX_REQUEST):
                    b = min(y, a + MAX_REQUEST)
                    cookies.append((h.aio_pwrite(view[a:b], base + a), base + a))
                    total += b - a
        except self._nbd.Error as exc:
            self._settle(h, "write", first, cookies, exc)
        self._settle(h, "write", first, cookies)
        return total

    def _settle(
        self, h: Any, what: str, first: int, cookies: list[tuple[int, int]], failed: Exception | None = None
    ) -> None:
        """Wait until no request is in flight on h (the caller's buffer is then its own again), then
        raise: the connection's error (``failed``: issuing a request failed; or the wait did), named
        by the call's first offset, else the first failed request's, named by its own. The requests
        are (cookie, offset)."""
        try:
            while h.aio_in_flight() > 0:
                h.poll(-1)
        except self._nbd.Error as exc:  # the connection died: nothing more will land in the buffer
            failed = failed or exc
        if failed is not None:
            raise self._fail(what, first, failed) from failed
        for cookie, at in cookies:
            try:
                h.aio_command_completed(cookie)
            except self._nbd.Error as exc:
                raise self._fail(what, at, exc) from exc

    def zero(self, offset: int, length: int) -> bool:
        """Make [offset, offset+length) read as zeros, letting the server deallocate it. False when the
        export cannot zero (the caller writes zeros)."""
        if not self.can_zero:
            return False
        h, done = self._handle(), 0
        while done < length:
            k = min(1 << 30, length - done)
            try:
                h.zero(k, offset + done)
            except self._nbd.Error as exc:
                raise self._fail("zero", offset + done, exc) from exc
            done += k
        return True

    def data_extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """(offset, end) of the allocated ranges within [start, end), from block status; all of it
        when the server does not report allocation. Adjacent data extents are merged."""
        end = min(end, self.size)
        if not self.has_status:
            if start < end:
                yield start, end
            return
        off, run = start, None
        while off < end:
            for a, b, data in self._status(off, end):
                a, b = max(a, off), min(b, end)
                off = b
                if data:
                    if run is not None and run[1] == a:
                        run = (run[0], b)
                    else:
                        if run is not None:
                            yield run
                        run = (a, b)
                if off >= end:
                    break
        if run is not None:
            yield run

    def _status(self, off: int, end: int) -> list[tuple[int, int, bool]]:
        """(start, end, holds data) pieces from off on, as one block status request answers. A
        read-only export keeps the last answer (up to 1 GiB) for the requests that fall in it: a
        delta asks for each block it examines, and a round trip costs more than the block's reads.
        Like the lseek of direct mode, the answer may be older than a write the running replica
        makes meanwhile; the next delta's change tracking or digests catch it, as in direct mode.

        How much to ask: nbdkit walks the whole span it is asked for (lseek by lseek), so a scan that
        goes on from the last answer asks twice as much as before, up to STATUS_SPAN, and a request at
        a new place (a tracked delta's next block, a sampled grain) asks STATUS_FIRST. With 1 GiB
        asked everywhere, a switch window on a 16 GiB disk walked 16 GiB of extents for 64 changed
        blocks, and one on 1 GiB walked 1 GiB."""
        known = self._known
        if known and known[0][0] <= off < known[-1][1]:
            return [piece for piece in known if piece[1] > off]
        got: list[int] = []

        def entries(ctx: str, _off: int, e: list[int], _err: Any) -> int:
            if ctx == "base:allocation":
                got.extend(e)
            return 0

        if self.writable:
            span = min(STATUS_SPAN, end - off)
        else:
            goes_on = bool(known) and off == known[-1][1]
            span = self._span = min(STATUS_SPAN, 2 * self._span) if goes_on else STATUS_FIRST
        span = min(span, self.size - off)
        try:
            self._handle().block_status(span, off, entries)
        except self._nbd.Error as exc:
            raise self._fail("block status", off, exc) from exc
        if not got:
            raise NbdError(f"{self.name}: NBD block status at offset {off} returned no extent")
        pieces, at, hole = [], off, self._nbd.STATE_HOLE
        for k in range(0, len(got), 2):
            pieces.append((at, min(at + got[k], self.size), not got[k + 1] & hole))
            at += got[k]
        if not self.writable:
            self._known = pieces
        return pieces

    def has_hole(self, start: int, end: int) -> bool:
        covered = start
        for a, b in self.data_extents(start, end):
            if a > covered:
                return True
            covered = b
        return covered < min(end, self.size)

    def flush(self) -> None:
        if self.can_flush and self.writable:
            try:
                self._handle().flush()
            except self._nbd.Error as exc:
                raise NbdError(f"{self.name}: NBD flush failed: {exc}") from exc

    def identity(self) -> tuple[int, int]:
        """Stands for a file's (st_dev, st_ino) in the recorded state: the export's name (the URI's
        path, not its host, port or socket, which a restarted server may change) and its size, so a
        resumed copy goes on only into an export of that name. The portal names each export after its
        session, VM and disk (failback/jobs/nbd.py)."""
        digest = hashlib.blake2b(urlsplit(self.uri).path.encode(), digest_size=7).digest()
        return -1, int.from_bytes(digest, "big") ^ self.size

    def fingerprint(self) -> list[int]:
        """NBD has no timestamps: the seal of an export is its size (see the module's doc)."""
        return [self.size, -1, -1, -1]
