"""The transfer engine over NBD: disks served by Debian's nbdkit (``file`` plugin), over TCP with TLS on
loopback (certificates made here with openssl) or a Unix socket, read and written through libnbd.

The same engine, the same leaves and digests as direct mode: phase 1 reads only what block status
says is allocated and leaves holes as holes; a delta writes only the changed pages; a killed copy and a
server that goes away resume from the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from failback.transfer import delta_copy, disk_digest, full_copy, verify_changes, verify_target
from failback.transfer.blockio import opened
from failback.transfer.nbd import READ_REQUEST, SEND_BUFFER, NbdError
from failback.transfer.sparse import data_extents

from .fs_support import data_sectors
from .nbd_support import NbdServer, make_certificates, require_nbd, served

pytestmark = pytest.mark.nbd

MiB = 1 << 20
KiB = 1 << 10
REPO = Path(__file__).resolve().parents[1]


def rand(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def make_image(path: Path, size: int, writes: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


def extents(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def inside(ranges: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    return all(any(a >= c and b <= d for c, d in outer) for a, b in ranges)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> str:
    require_nbd()
    return make_certificates(str(tmp_path_factory.mktemp("nbd-tls")))


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, Path, Path]:
    return tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "state"


SHAPE = {
    0: rand(3 * MiB, 1),  # whole blocks
    10 * MiB + 8 * KiB: rand(16 * KiB, 2),  # a few pages inside one block
    20 * MiB - 64 * KiB: rand(128 * KiB, 3),  # across a block boundary
    40 * MiB: rand(MiB + 4 * KiB, 4),
    50 * MiB + 4 * KiB: bytes(8 * KiB) + rand(4 * KiB, 5),  # allocated zeros, then data, then a hole
}


def test_it_copies_over_tls_reading_only_allocated_extents_and_keeping_holes(disk, certs, tmp_path) -> None:
    src, dst, state = disk
    size = 64 * MiB
    make_image(src, size, SHAPE)
    make_image(dst, size, {})

    with (
        served(str(src), readonly=True, certs=certs, workdir=str(tmp_path)) as s,
        served(str(dst), readonly=False, certs=certs, workdir=str(tmp_path)) as d,
    ):
        assert s.uri.startswith("nbds://127.0.0.1:")  # TLS over TCP
        result = full_copy(s.uri, d.uri, state_dir=str(state), block_size=MiB)
        proof = verify_changes(s.uri, d.uri, state_dir=str(state))
        assert verify_target(d.uri, state_dir=str(state)) == result.digest

    assert dst.read_bytes() == src.read_bytes()
    assert inside(extents(dst), extents(src)), "the target has data where the source has holes"
    assert allocated(dst) <= allocated(src)
    assert result.bytes_total == sum(b - a for a, b in extents(src))  # block status: only allocated extents
    assert result.bytes_read == result.bytes_total
    assert result.bytes_written == result.bytes_total - 8 * KiB  # zero pages are not sent
    assert result.digest == result.source_digest == disk_digest(str(src), MiB) == disk_digest(str(dst), MiB)
    assert proof.identical and proof.target_digest == result.digest


def test_a_delta_over_nbd_writes_only_the_changed_pages_and_punches_discards(disk, certs, tmp_path) -> None:
    src, dst, state = disk
    size = 32 * MiB
    make_image(src, size, {0: rand(8 * MiB, 1), 20 * MiB: rand(2 * MiB, 2)})
    make_image(dst, size, {})
    with (
        served(str(src), readonly=True, certs=certs, workdir=str(tmp_path)) as s,
        served(str(dst), readonly=False, certs=certs, workdir=str(tmp_path)) as d,
    ):
        full_copy(s.uri, d.uri, state_dir=str(state))
        with open(src, "r+b") as f:
            f.seek(MiB + 100)
            f.write(rand(5000, 9))  # two pages (crosses a page boundary)
        fd = os.open(src, os.O_RDWR)
        try:  # the guest discards 1 MiB: the source gets a hole there
            os.truncate(src, size)
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            assert libc.fallocate(fd, 3, ctypes.c_int64(21 * MiB), ctypes.c_int64(MiB)) == 0
        finally:
            os.close(fd)
        tracked = delta_copy(s.uri, d.uri, state_dir=str(state), changed_extents=[(MiB + 100, 5000), (21 * MiB, MiB)])
        again = delta_copy(s.uri, d.uri, state_dir=str(state), changed_extents=None)  # digest method: nothing left
        proof = verify_changes(s.uri, d.uri, state_dir=str(state))

    assert tracked.method == "tracked"
    assert tracked.bytes_written == 8 * KiB  # the two changed pages; the discard is punched, not written
    assert again.method == "digest" and again.bytes_written == 0
    assert dst.read_bytes() == src.read_bytes()
    assert inside(extents(dst), extents(src))
    assert proof.identical and proof.source_digest == disk_digest(str(src))


def _scatter(src: Path, blocks: int) -> list[tuple[int, int]]:
    """Change one page in each of ``blocks`` 1 MiB blocks of src and discard 64 KiB in every fourth
    (a guest's writes and TRIMs): the changed extents, as change tracking reports them."""
    changed = []
    with open(src, "r+b") as f:
        for i in range(blocks):
            f.seek(i * MiB + 12 * KiB)
            f.write(rand(4 * KiB, 100 + i))
            changed.append((i * MiB + 12 * KiB, 4 * KiB))
    fd = os.open(src, os.O_RDWR)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        for i in range(0, blocks, 4):
            assert libc.fallocate(fd, 3, ctypes.c_int64(i * MiB + 256 * KiB), ctypes.c_int64(64 * KiB)) == 0
            changed.append((i * MiB + 256 * KiB, 64 * KiB))
    finally:
        os.close(fd)
    return changed


def test_a_quiet_tracked_delta_over_nbd_asks_ahead_and_confirms_in_batches(disk, tmp_path) -> None:
    """The switch's final delta over NBD: the window's blocks are read ahead (replica and production
    disk together) and their writes confirmed and read back in batches (examine.Reads, delta._write_aside):
    more blocks than one batch, every byte as on the replica, the discards given back."""
    require_nbd()
    src, dst, state = disk
    blocks = 80  # more than WRITE_BATCH: two batches
    size = blocks * MiB
    make_image(src, size, {0: rand(size, 1)})
    make_image(dst, size, {})
    with (
        served(str(src), readonly=True, certs=None, workdir=str(tmp_path)) as s,
        served(str(dst), readonly=False, certs=None, workdir=str(tmp_path)) as d,
    ):
        full_copy(s.uri, d.uri, state_dir=str(state), block_size=MiB)
        changed = _scatter(src, blocks)
        result = delta_copy(s.uri, d.uri, state_dir=str(state), changed_extents=changed, source_quiet=True)
        proof = verify_changes(s.uri, d.uri, state_dir=str(state))

    assert result.method == "tracked"
    assert result.bytes_written == blocks * 4 * KiB  # the changed pages; the discards are zeroed, not written
    assert result.target_bytes_read <= 2 * sum(n for _, n in changed)  # named pages, then the read-back
    assert dst.read_bytes() == src.read_bytes()
    assert inside(extents(dst), extents(src)) and data_sectors(str(dst)) <= data_sectors(
        str(src)
    )  # data, not ext4 tree blocks
    assert proof.identical and proof.target_sealed and proof.source_digest == disk_digest(str(src), MiB)
    assert verify_target(str(dst), state_dir=str(state)) == result.digest


def test_a_server_gone_while_writes_wait_for_confirmation_stops_the_delta_and_the_next_finishes(disk, tmp_path) -> None:
    """Writes over NBD are confirmed after the block's leaves moved: when the production disk's server
    goes away first, the pass says so, keeps the target unsealed, and the next pass re-reads it and
    finishes the change."""
    require_nbd()
    src, dst, state = disk
    blocks = 80
    size = blocks * MiB
    make_image(src, size, {0: rand(size, 1)})
    make_image(dst, size, {})
    with served(str(src), readonly=True, certs=None, workdir=str(tmp_path)) as s:
        target = NbdServer(str(dst), False, None, str(tmp_path)).start()
        try:
            full_copy(s.uri, target.uri, state_dir=str(state), block_size=MiB)
            changed = _scatter(src, blocks)

            def pull_the_plug(p) -> None:
                if p.bytes_done >= p.bytes_total // 2:
                    target.kill()

            with pytest.raises(NbdError) as caught:
                delta_copy(
                    s.uri, target.uri, state_dir=str(state), changed_extents=changed, source_quiet=True,
                    progress=pull_the_plug, progress_interval=0,
                )  # fmt: skip
            assert "failed" in str(caught.value) or "cannot connect" in str(caught.value)
            assert json.loads((state / "state.json").read_text())["target_seal"] is None

            target.start()
            result = delta_copy(s.uri, target.uri, state_dir=str(state), changed_extents=[], source_quiet=True)
        finally:
            target.stop()
    assert not result.target_untouched  # re-read: its writes were never confirmed
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == disk_digest(str(src), MiB) == verify_target(str(dst), state_dir=str(state))


def test_a_unix_socket_export_and_a_local_file_mix(disk, tmp_path) -> None:
    require_nbd()
    src, dst, state = disk
    make_image(src, 16 * MiB, {MiB: rand(3 * MiB, 1)})
    make_image(dst, 16 * MiB, {})
    with served(str(dst), readonly=False, certs=None, workdir=str(tmp_path)) as d:
        assert d.uri.startswith("nbd+unix:///")
        result = full_copy(str(src), d.uri, state_dir=str(state))  # a local file into an export
    assert dst.read_bytes() == src.read_bytes() and result.bytes_written == 3 * MiB
    assert inside(extents(dst), extents(src))


def test_reads_land_in_the_callers_buffer_across_requests_and_stop_at_the_end(tmp_path) -> None:
    """preadv reads into the caller's memory with several requests in flight: the bytes are the
    file's, the buffer past the export's end is untouched, and a server gone is a clear NbdError.
    The connection's Unix socket has the wider send buffer (up to the kernel's cap)."""
    require_nbd()
    path = tmp_path / "disk.img"
    size = 3 * READ_REQUEST + 12 * KiB  # several requests and a short last one
    path.write_bytes(rand(size, 9))
    server = NbdServer(str(path), readonly=True, workdir=str(tmp_path)).start()
    try:
        with opened(server.uri, os.O_RDONLY) as d:
            buf = bytearray(b"\xee" * (size + 64 * KiB))
            view = memoryview(buf)
            assert d.preadv(view[4 * KiB :], 0) == size
            assert buf[4 * KiB : 4 * KiB + size] == path.read_bytes()
            assert buf[: 4 * KiB] == b"\xee" * (4 * KiB) and buf[4 * KiB + size :] == b"\xee" * (60 * KiB)
            assert d.preadv(view[: 8 * KiB], size - 4 * KiB) == 4 * KiB
            with socket.socket(fileno=os.dup(d._handle().aio_get_fd())) as sock:  # a wider send buffer
                wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= min(SEND_BUFFER, wmem_max)
            server.kill()
            with pytest.raises(NbdError, match=r"nbd\+unix://.*: NBD read at offset 0 failed"):
                d.preadv(view, 0)
    finally:
        server.stop()


def test_a_killed_copy_resumes_from_its_checkpoint_and_is_identical(disk, certs, tmp_path) -> None:
    src, dst, state = disk
    size = 48 * MiB
    make_image(src, size, {0: rand(20 * MiB, 1), 30 * MiB: rand(10 * MiB, 2), 44 * MiB: bytes(MiB)})
    make_image(dst, size, {})
    code = (
        "import sys; from failback.transfer import full_copy; "
        "full_copy(sys.argv[1], sys.argv[2], state_dir=sys.argv[3], block_size=1 << 20, "
        "bandwidth_limit_bps=10e6, checkpoint_interval=0.1)"
    )
    with (
        served(str(src), readonly=True, certs=certs, workdir=str(tmp_path)) as s,
        served(str(dst), readonly=False, certs=certs, workdir=str(tmp_path)) as d,
    ):
        proc = subprocess.Popen([sys.executable, "-c", code, s.uri, d.uri, str(state)], cwd=REPO)
        checkpoint = _kill_after(proc, state / "state.json", 8 * MiB)
        result = full_copy(s.uri, d.uri, state_dir=str(state), block_size=MiB)
        assert verify_target(d.uri, state_dir=str(state)) == result.digest

    assert not checkpoint["complete"] and 0 < checkpoint["position"] < size
    assert result.resumed_from == checkpoint["position"]
    assert result.bytes_total < 30 * MiB  # only what lies past the checkpoint
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == disk_digest(str(src), MiB)
    assert inside(extents(dst), extents(src))


def _kill_after(proc: subprocess.Popen, state_file: Path, position: int) -> dict:
    """SIGKILL the copy once its checkpoint is past ``position``; the checkpoint it left."""
    try:
        deadline = time.monotonic() + 30
        seen = 0
        while seen < position:
            assert proc.poll() is None, "the copy ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
            try:
                seen = json.loads(state_file.read_text())["position"]
            except (OSError, ValueError, KeyError):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return json.loads(state_file.read_text())


def test_a_server_that_goes_away_gives_a_clear_error_and_the_copy_resumes(disk, certs, tmp_path) -> None:
    src, dst, state = disk
    size = 40 * MiB
    make_image(src, size, {0: rand(32 * MiB, 1)})
    make_image(dst, size, {})
    with served(str(src), readonly=True, certs=certs, workdir=str(tmp_path)) as s:
        target = NbdServer(str(dst), False, certs, str(tmp_path)).start()
        try:

            def pull_the_plug(p) -> None:
                if p.bytes_done >= 8 * MiB:
                    target.kill()  # nbdkit killed mid-copy: connections drop

            with pytest.raises(NbdError) as caught:
                full_copy(
                    s.uri, target.uri, state_dir=str(state), block_size=MiB, progress=pull_the_plug,
                    progress_interval=0, checkpoint_interval=0.05,
                )  # fmt: skip
            message = str(caught.value)
            assert f"nbds://127.0.0.1:{target.port}/" in message and "tls-certificates" not in message
            assert "failed" in message or "cannot connect" in message
            checkpoint = json.loads((state / "state.json").read_text())
            assert not checkpoint["complete"]

            target.start()  # the server is back, at the same address
            result = full_copy(s.uri, target.uri, state_dir=str(state), block_size=MiB)
        finally:
            target.stop()
    assert result.resumed_from == checkpoint["position"]
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == disk_digest(str(src), MiB)


def test_it_refuses_a_read_only_target_and_an_export_of_another_size(disk, certs, tmp_path) -> None:
    src, dst, state = disk
    make_image(src, 8 * MiB, {0: rand(MiB, 1)})
    make_image(dst, 4 * MiB, {})
    with served(str(dst), readonly=True, certs=certs, workdir=str(tmp_path)) as d:
        with pytest.raises(NbdError, match="read-only"):
            full_copy(str(src), d.uri, state_dir=str(state))
    with served(str(dst), readonly=False, certs=certs, workdir=str(tmp_path)) as d:
        with pytest.raises(NbdError, match=r"the export is 4194304 bytes, the source 8388608"):
            full_copy(str(src), d.uri, state_dir=str(state))


def test_an_unreachable_export_names_itself_without_its_key_files(tmp_path, certs) -> None:
    uri = f"nbds://127.0.0.1:1/?tls-certificates={certs}"
    with pytest.raises(NbdError, match=r"nbds://127\.0\.0\.1:1/: cannot connect to the NBD export"):
        with opened(uri, os.O_RDONLY):
            pass


def test_without_libnbd_it_says_what_to_install(tmp_path) -> None:
    code = (
        "import sys; sys.modules['nbd'] = None\n"  # as on a machine without python3-libnbd
        "from failback.transfer import disk_digest\n"
        "try:\n    disk_digest('nbd+unix:///?socket=/nonexistent')\n"
        "except OSError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "python3-libnbd" in out and "tests/nbd_venv.sh" in out
