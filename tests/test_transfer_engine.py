"""The transfer engine on real sparse files: sparseness, deltas, resume after a real kill, bandwidth,
progress, verification. No Django, no database."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from failback.transfer import (
    CopyResult,
    Progress,
    StateBusyError,
    TransferCancelled,
    TransferStateError,
    VerificationError,
    delta_copy,
    disk_digest,
    engine,
    full_copy,
    passes,
    target_untouched,
    verify_changes,
    verify_target,
)
from failback.transfer.blockmap import fine_stamps, fingerprint, seal
from failback.transfer.progress import Pacer
from failback.transfer.sparse import data_extents, punch_hole

MiB = 1 << 20
KiB = 1 << 10
REPO = Path(__file__).resolve().parents[1]


def rand(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def make_image(path: Path, size: int, writes: dict[int, bytes]) -> None:
    """A sparse file of ``size`` bytes holding ``writes`` (offset -> bytes); the rest are holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


def patch(path: Path, writes: dict[int, bytes]) -> None:
    with open(path, "r+b") as f:
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


def extents(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def reseal(dst: Path, state: Path) -> None:
    """Make the recorded seal match dst again, as a change the fingerprint cannot see would."""
    data = json.loads((state / "state.json").read_text())
    st = os.stat(dst)
    data["target_seal"] = [st.st_size, st.st_blocks, st.st_mtime_ns, st.st_ctime_ns]
    (state / "state.json").write_text(json.dumps(data))


def inside(ranges: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    return all(any(a >= c and b <= d for c, d in outer) for a, b in ranges)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, Path, Path]:
    return tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "state"


def test_it_keeps_holes_as_holes(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    size = 64 * MiB
    make_image(
        src,
        size,
        {
            0: rand(3 * MiB, 1),  # whole blocks
            10 * MiB + 8 * KiB: rand(16 * KiB, 2),  # a few pages inside one block
            20 * MiB - 64 * KiB: rand(128 * KiB, 3),  # across a block boundary
            40 * MiB: rand(MiB + 4 * KiB, 4),
            50 * MiB + 4 * KiB: bytes(8 * KiB) + rand(4 * KiB, 5),  # data after zeros, then a hole
        },
    )
    dst.touch()
    os.truncate(dst, size)  # as the hypervisor makes it: an empty sparse file of the same size

    result = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)

    assert dst.read_bytes() == src.read_bytes()
    assert inside(extents(dst), extents(src)), "the target has data where the source has holes"
    assert allocated(dst) <= allocated(src)
    assert result.bytes_total == sum(b - a for a, b in extents(src))
    assert result.bytes_written == result.bytes_total - 8 * KiB  # the zero pages are not written
    assert result.zero_bytes_skipped == 8 * KiB
    assert result.digest == disk_digest(str(src), MiB) == disk_digest(str(dst), MiB)
    assert result.method == "full" and result.resumed_from == 0


def test_it_does_not_write_zero_blocks(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    size = 32 * MiB
    make_image(src, size, {0: rand(MiB, 1), 4 * MiB: bytes(6 * MiB), 12 * MiB: rand(MiB, 2)})
    zero_allocated = 6 * MiB
    assert allocated(src) >= 8 * MiB  # the zeros are really allocated in the source

    result = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)

    assert result.bytes_written == 2 * MiB
    assert result.zero_bytes_skipped == zero_allocated
    assert allocated(dst) <= 2 * MiB + 64 * KiB
    assert inside(extents(dst), [(0, MiB), (12 * MiB, 13 * MiB)])
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == disk_digest(str(src), MiB)


def test_it_copies_without_copy_file_range_too(disk: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst, state = disk
    make_image(src, 16 * MiB, {0: rand(2 * MiB, 1), 5 * MiB + 4 * KiB: rand(8 * KiB, 2), 9 * MiB: bytes(MiB)})

    def cross_device(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)  # as between two filesystems
    result = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)

    assert dst.read_bytes() == src.read_bytes()
    assert inside(extents(dst), extents(src)) and result.zero_bytes_skipped == MiB
    assert result.digest == disk_digest(str(src), MiB)


def test_a_source_changing_during_the_copy_is_caught_by_the_next_delta(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 16 * MiB, {0: rand(16 * MiB, 1)})
    changed = False

    def guest_writes(p: Progress) -> None:  # the replica keeps running during phase 1
        nonlocal changed
        if not changed and p.bytes_done >= 4 * MiB:
            patch(src, {MiB + 3: b"behind", 12 * MiB + 5: b"ahead", 14 * MiB: bytes(MiB)})
            changed = True

    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, progress=guest_writes, progress_interval=0)
    assert changed
    verify_target(str(dst), state_dir=str(state))  # the map describes exactly what the target holds
    assert dst.read_bytes() != src.read_bytes()

    delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=None)
    assert dst.read_bytes() == src.read_bytes()


def test_it_copies_a_size_that_is_not_a_multiple_of_the_block(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    size = 5 * MiB + 12345
    make_image(src, size, {MiB - 10: rand(20, 1), 5 * MiB: rand(12345, 2)})

    result = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)

    assert os.path.getsize(dst) == size
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == disk_digest(str(src), MiB) == verify_target(str(dst), state_dir=str(state))


@pytest.mark.parametrize("tracked", [False, True])
def test_a_short_last_page_of_zeros_is_not_written_into_a_hole(disk: tuple[Path, Path, Path], tracked: bool) -> None:
    """The disk's last page is 57 bytes long and a hole on both sides; data lands just before it."""
    src, dst, state = disk
    size = 131 * 4 * KiB + 57
    make_image(src, size, {})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    patch(src, {125 * 4 * KiB: rand(16 * KiB, 1)})
    named = [(125 * 4 * KiB, 16 * KiB)] if tracked else None

    result = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=named, durable=False)

    assert dst.read_bytes() == src.read_bytes()
    assert result.bytes_written == 16 * KiB
    assert extents(dst) == extents(src) == [(125 * 4 * KiB, 129 * 4 * KiB)]


def test_the_digest_depends_on_content_not_on_sparseness(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 8 * MiB, {3 * MiB: rand(100, 1)})
    make_image(b, 8 * MiB, {0: bytes(3 * MiB) + rand(100, 1) + bytes(MiB)})  # same bytes, zeros written

    assert disk_digest(str(a), MiB) == disk_digest(str(b), MiB)
    assert disk_digest(str(a), MiB).startswith("xxh3-tree3-64KiB:")
    assert disk_digest(str(a), MiB) == disk_digest(str(a), 2 * MiB)  # the block size is only the I/O unit
    make_image(b, 8 * MiB, {3 * MiB: rand(100, 2)})
    assert disk_digest(str(a), MiB) != disk_digest(str(b), MiB)


def test_the_disk_digest_is_what_the_documented_recipe_computes(tmp_path: Path) -> None:
    """docs/decisions.md gives an auditor a recipe that recomputes a digest without the portal; it must
    give the engine's figure, on a disk whose size is not a multiple of the grain or of a node (three
    nodes of 256 MiB, the last one short, the middle one all holes), with holes and zeros."""
    import struct

    import xxhash

    img = tmp_path / "a.img"
    size = 600 * MiB + 12345
    make_image(img, size, {0: rand(100_000, 1), 2 * MiB: bytes(128 * KiB), 520 * MiB: rand(12345, 2)})
    g, n = 64 * KiB, 4096
    with open(img, "rb") as f:
        root = xxhash.xxh3_128(b"failback-leaftree-v5\0" + struct.pack("<QQ", size, g))
        while True:
            grains = [f.read(g) for _ in range(n)]
            node = b"".join(bytes(16) if x.count(0) == len(x) else xxhash.xxh3_128_digest(x) for x in grains if x)
            if not node:
                break
            root.update(bytes(16) if node.count(0) == len(node) else xxhash.xxh3_128_digest(node))
    recipe = "xxh3-tree3-64KiB:" + root.hexdigest()

    assert disk_digest(str(img), MiB) == recipe
    docs = (REPO / "docs" / "decisions.md").read_text()
    assert 'xxhash.xxh3_128(b"failback-leaftree-v5\\0"' in docs and 'print("xxh3-tree3-64KiB:"' in docs


def test_a_delta_recomputes_the_nodes_it_moved_and_trusts_the_others_only_under_the_seal(
    disk: tuple[Path, Path, Path],
) -> None:
    """Four nodes of 256 MiB: a tracked delta in two of them gives the disk's digest from the nodes it
    computed again and those the last pass left. A nodes file changed behind the engine's back no longer
    has the recorded digest as its root, so every node is computed again and the digest stays the disk's."""
    src, dst, state = disk
    size = 1024 * MiB
    make_image(src, size, {0: rand(MiB, 1), 300 * MiB: rand(MiB, 2), 700 * MiB: rand(MiB, 3)})
    full_copy(str(src), str(dst), state_dir=str(state), durable=False)
    nodes = state / "target.nodes"
    assert nodes.stat().st_size == 4 * 16

    patch(src, {4 * KiB: rand(4 * KiB, 4), 800 * MiB: rand(8 * KiB, 5)})  # nodes 0 and 3 (3 was holes)
    result = delta_copy(
        str(src), str(dst), state_dir=str(state), changed_extents=[(4 * KiB, 4 * KiB), (800 * MiB, 8 * KiB)]
    )
    assert result.digest == result.source_digest == disk_digest(str(src)) == disk_digest(str(dst))
    assert verify_changes(str(src), str(dst), state_dir=str(state)).identical

    with open(nodes, "r+b") as f:  # a stale node 1 (behind the engine's back)
        f.seek(16)
        f.write(bytes(16))
    patch(src, {8 * KiB: rand(4 * KiB, 6)})
    result = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=[(8 * KiB, 4 * KiB)])
    assert result.digest == result.source_digest == disk_digest(str(src))
    assert nodes.read_bytes()[16:32] != bytes(16)  # computed again


def test_a_state_of_the_previous_version_is_kept_with_its_digests_recomputed(disk: tuple[Path, Path, Path]) -> None:
    """State version 3 had a BLAKE3 root over the same leaves: an upgrade in the middle of a failback
    recomputes the digests from the leaves and goes on with a delta, without copying the disk again."""
    src, dst, state = disk
    make_image(src, 8 * MiB, {0: rand(3 * MiB, 1)})
    first = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    data = json.loads((state / "state.json").read_text())
    data.update(version=3, digest="xxh3-tree-64KiB:" + "ab" * 32, source_digest="xxh3-tree-64KiB:" + "cd" * 32)
    (state / "state.json").write_text(json.dumps(data))
    patch(src, {MiB: rand(4 * KiB, 2)})

    assert target_untouched(str(dst), state_dir=str(state))
    result = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=[(MiB, 4 * KiB)], durable=False)

    assert result.method == "tracked" and result.bytes_written == 4 * KiB and result.target_untouched
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == result.source_digest == disk_digest(str(src))
    assert result.digest.startswith("xxh3-tree3-64KiB:") and first.digest.startswith("xxh3-tree3-64KiB:")
    assert json.loads((state / "state.json").read_text())["version"] == 5
    data.update(version=2)  # BLAKE3 leaves: nothing to build on
    (state / "state.json").write_text(json.dumps(data))
    with pytest.raises(TransferStateError, match="no completed full copy"):
        delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=None, durable=False)


def test_it_sends_only_the_changed_blocks_with_tracked_extents(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 32 * MiB, {0: rand(16 * MiB, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    patch(src, {2 * MiB + 100: rand(1000, 2), 7 * MiB: rand(MiB, 3), 20 * MiB: rand(10, 4)})
    changed = [(2 * MiB + 100, 1000), (7 * MiB, MiB), (20 * MiB, 10), (30 * MiB, 4096)]  # the last: unchanged

    result = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=changed, durable=False)

    assert result.method == "tracked"
    assert result.bytes_read == 19 * 64 * KiB  # only the 64 KiB grains the extents touch
    assert result.bytes_written == 4 * KiB + MiB + 4 * KiB  # the changed 4 KiB pages; the 4th is unchanged
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == disk_digest(str(src), MiB)


def test_a_write_missed_by_a_live_pass_is_caught_there_and_a_quiet_pass_reads_only_named_pages(
    disk: tuple[Path, Path, Path],
) -> None:
    """A catch-up pass runs while the guest writes: a page written after the change id was taken is in
    the grain the pass reads but not in its extents. Without source_quiet the grain is compared whole,
    so the page goes across and both leaves stay true. With source_quiet (the final delta: replica off)
    only the named pages are compared and read back, on the trust change tracking already has."""
    src, dst, state = disk
    make_image(src, 4 * MiB, {0: rand(2 * MiB, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)

    patch(src, {64 * KiB: rand(4 * KiB, 2), 64 * KiB + 8 * KiB: rand(4 * KiB, 3)})  # the 2nd page: not named
    live = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=[(64 * KiB, 4 * KiB)], durable=False)
    assert dst.read_bytes() == src.read_bytes()
    assert live.bytes_written == 8 * KiB and live.target_bytes_read >= 64 * KiB  # the grain compared whole

    patch(src, {3 * 64 * KiB: rand(4 * KiB, 4), 5 * 64 * KiB + 4 * KiB: rand(8 * KiB, 5)})
    patch(src, {7 * 64 * KiB: rand(4 * KiB, 8)})  # named with the page after it, rewritten unchanged
    named = [(3 * 64 * KiB, 4 * KiB), (5 * 64 * KiB + 4 * KiB, 8 * KiB), (7 * 64 * KiB, 8 * KiB)]
    quiet = delta_copy(
        str(src), str(dst), state_dir=str(state), changed_extents=named, durable=False, source_quiet=True
    )
    assert dst.read_bytes() == src.read_bytes() and quiet.digest == disk_digest(str(src), MiB)
    assert quiet.bytes_written == 16 * KiB  # not grain 7's unchanged page
    # Read back: the 16 KiB written. Compared first: the 8 KiB named in grains 5 and 7 each; not grain
    # 3's one named page, which is the page that changed (its grain's leaf moved, nothing else in it can).
    assert quiet.target_bytes_read == 16 * KiB + 2 * 8 * KiB
    assert quiet.bytes_read == 3 * 64 * KiB  # the replica's named grains, read whole for their leaves

    # Named pages in grains that read all zeros at the last pass (holes): on the replica too, only
    # those pages are read; the rest of each grain is zeros without being read.
    patch(src, {3 * MiB: rand(4 * KiB, 6), 3 * MiB + 64 * KiB + 60 * KiB: rand(8 * KiB, 7)})
    named = [(3 * MiB, 4 * KiB), (3 * MiB + 64 * KiB + 60 * KiB, 8 * KiB)]  # the second spans two grains
    holes = delta_copy(
        str(src), str(dst), state_dir=str(state), changed_extents=named, durable=False, source_quiet=True
    )
    assert dst.read_bytes() == src.read_bytes() and holes.digest == disk_digest(str(src), MiB)
    assert holes.bytes_read == holes.bytes_written == 12 * KiB
    assert holes.target_bytes_read == 12 * KiB  # read back; nothing compared (the target's grains were zeros)


def test_it_sends_only_the_changed_blocks_by_digest_comparison(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 32 * MiB, {0: rand(16 * MiB, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    patch(src, {5 * MiB + 7: b"x", 24 * MiB: rand(MiB, 2), 9 * MiB: bytes(MiB)})  # 9 MiB block becomes zero

    result = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=None, durable=False)

    assert result.method == "digest"
    assert result.bytes_written == 4 * KiB + MiB  # the changed page and the new MiB; the zeroed one is punched
    assert result.zero_bytes_skipped == MiB
    assert dst.read_bytes() == src.read_bytes()
    assert not any(a < 10 * MiB and b > 9 * MiB for a, b in extents(dst)), "the zeroed block is not a hole"
    assert result.digest == disk_digest(str(src), MiB) == verify_target(str(dst), state_dir=str(state))
    again = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=None, durable=False)
    assert again.bytes_written == 0 and again.digest == result.digest


@pytest.mark.parametrize("tracked", [False, True], ids=["digest", "tracked"])
def test_it_gives_back_the_space_of_zero_pages_the_source_discarded(
    disk: tuple[Path, Path, Path], tracked: bool
) -> None:
    src, dst, state = disk
    # One grain of data with zeroed (allocated) pages in it: phase 1 copies them as they are.
    grain = rand(4 * KiB, 1) + bytes(24 * KiB) + rand(36 * KiB, 2)
    make_image(src, 8 * MiB, {MiB: grain})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    assert allocated(dst) == allocated(src) == 64 * KiB
    fd = os.open(src, os.O_RDWR)
    try:  # the guest discards the zeroed pages: the content is the same, the space is given back
        assert punch_hole(fd, MiB + 4 * KiB, 24 * KiB)
    finally:
        os.close(fd)

    extents_changed = [(MiB + 4 * KiB, 24 * KiB)] if tracked else None
    result = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=extents_changed, durable=False)

    assert dst.read_bytes() == src.read_bytes()
    assert result.bytes_written == 0
    assert extents(dst) == extents(src) == [(MiB, MiB + 4 * KiB), (MiB + 28 * KiB, MiB + 64 * KiB)]
    assert allocated(dst) == allocated(src) == 40 * KiB
    assert result.digest == disk_digest(str(src), MiB) == verify_target(str(dst), state_dir=str(state))


def test_a_quiet_pass_gives_back_a_discard_it_was_not_told_of_beside_one_it_was(
    disk: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet tracked delta puts into the block's buffer only the named pages of a named grain both
    sides held alike, and the grain whole where its spare pages are looked for (a named page of
    zeros). There the pages change tracking did not name must read as the source's, not as what the
    buffer held before: the pass's buffers are filled with 0xff first, as a pass before left them."""
    src, dst, state = disk
    grain = rand(4 * KiB, 1) + bytes(24 * KiB) + rand(36 * KiB, 2)
    make_image(src, 8 * MiB, {MiB: grain})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    fd = os.open(src, os.O_RDWR)
    try:  # the guest discards the six zeroed pages; change tracking names the last two only
        assert punch_hole(fd, MiB + 4 * KiB, 24 * KiB)
    finally:
        os.close(fd)
    monkeypatch.setitem(passes._spare, MiB, [bytearray(b"\xff" * MiB) for _ in range(passes.SPARE_BUFFERS)])

    result = delta_copy(
        str(src),
        str(dst),
        state_dir=str(state),
        changed_extents=[(MiB + 20 * KiB, 8 * KiB)],
        durable=False,
        source_quiet=True,
    )

    assert dst.read_bytes() == src.read_bytes()
    assert result.bytes_written == 0
    assert extents(dst) == extents(src) == [(MiB, MiB + 4 * KiB), (MiB + 28 * KiB, MiB + 64 * KiB)]
    assert allocated(dst) == allocated(src) == 40 * KiB
    assert result.digest == disk_digest(str(src), MiB) == verify_target(str(dst), state_dir=str(state))


def test_a_write_to_the_target_between_passes_is_seen_and_repaired(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 16 * MiB, {0: rand(8 * MiB, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    assert target_untouched(str(dst), state_dir=str(state))
    patch(dst, {3 * MiB + 5000: b"\xff", 12 * MiB: b"junk"})  # someone wrote to the powered-off disk

    assert not target_untouched(str(dst), state_dir=str(state))
    delta = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=[], durable=False)

    assert not delta.target_untouched and delta.target_bytes_read >= 8 * MiB  # re-read once
    assert delta.bytes_written == 4 * KiB  # the bad page; the junk in the hole is punched
    assert dst.read_bytes() == src.read_bytes()
    assert target_untouched(str(dst), state_dir=str(state))
    assert verify_target(str(dst), state_dir=str(state)) == delta.digest == disk_digest(str(src))


def test_corruption_the_seal_cannot_see_is_caught_by_a_full_verification(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 16 * MiB, {0: rand(8 * MiB, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    patch(dst, {3 * MiB + 5000: b"\xff"})
    reseal(dst, state)  # as corruption below the filesystem would leave it: size and timestamps unchanged

    delta = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=None, durable=False)
    assert delta.bytes_written == 0 and delta.target_untouched  # the delta trusts the leaves

    with pytest.raises(VerificationError) as caught:
        verify_target(str(dst), state_dir=str(state))
    assert caught.value.offset == 3 * MiB
    assert str(3 * MiB) in str(caught.value)


def test_the_switch_verification_trusts_recorded_digests_only_while_the_leaves_are_as_the_pass_left_them(
    disk: tuple[Path, Path, Path],
) -> None:
    src, dst, state = disk
    make_image(src, 16 * MiB, {0: rand(4 * MiB, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    patch(src, {MiB + 4 * KiB: rand(8 * KiB, 2)})
    delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=[(MiB + 4 * KiB, 8 * KiB)], durable=False)
    stamps = {n: os.stat(state / n).st_ctime_ns for n in ("source.leaves", "target.leaves")}

    proof = verify_changes(str(src), str(dst), state_dir=str(state))
    assert proof.identical and proof.target_digest == disk_digest(str(dst)) == disk_digest(str(src))
    assert {n: os.stat(state / n).st_ctime_ns for n in stamps} == stamps  # reading them stamps nothing

    # At once (the pass sealed its leaves after the clock's tick moved on), a wrong leaf for a grain of
    # the hole at 12 MiB: no sample reads there, so only a digest hashed from the leaves again sees it.
    with open(state / "target.leaves", "r+b") as f:
        f.seek(12 * MiB // (64 * KiB) * 16)
        f.write(b"\x01" * 16)
    proof = verify_changes(str(src), str(dst), state_dir=str(state))
    assert not proof.identical
    assert proof.source_digest == disk_digest(str(src)) != proof.target_digest


def test_a_write_at_once_after_a_seal_always_breaks_it(tmp_path: Path) -> None:
    """Whether the seal waits for the clock's tick or the filesystem stamps finer times after a stat
    (fine_stamps: true here), no write can follow the seal unseen, however soon."""
    path = tmp_path / "disk.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for k in range(200):
            os.pwrite(fd, b"engine", k)
            sealed = seal(fd)
            os.pwrite(fd, b"others", k)  # same size, same blocks: only the timestamps can tell
            assert fingerprint(fd) != sealed
    finally:
        os.close(fd)
    assert fine_stamps(str(tmp_path)) == fine_stamps(str(tmp_path))  # probed once, then remembered
    assert not fine_stamps(str(tmp_path / "missing")) and not fine_stamps(None)


def test_verification_catches_data_in_a_hole_of_the_target(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 16 * MiB, {0: rand(MiB, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    patch(dst, {12 * MiB + 1: b"junk"})

    with pytest.raises(VerificationError) as caught:
        verify_target(str(dst), state_dir=str(state))
    assert caught.value.offset == 12 * MiB


def test_a_killed_copy_resumes_and_is_identical(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    size = 48 * MiB
    make_image(src, size, {0: rand(20 * MiB, 1), 30 * MiB: rand(10 * MiB, 2), 44 * MiB: bytes(MiB)})
    code = (
        "import sys; from failback.transfer import full_copy; "
        "full_copy(sys.argv[1], sys.argv[2], state_dir=sys.argv[3], block_size=1 << 20, "
        "bandwidth_limit_bps=10e6, checkpoint_interval=0.1)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(dst), str(state)], cwd=REPO)
    state_file = state / "state.json"
    try:
        deadline = time.monotonic() + 30
        position = 0
        while position < 8 * MiB:
            assert proc.poll() is None, "the copy ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
            try:
                position = json.loads(state_file.read_text())["position"]
            except (OSError, ValueError, KeyError):
                pass
        # a second pass on the same disk, from another process, is refused while the copy runs
        with pytest.raises(StateBusyError, match="one pass at a time"):
            full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB)
        with pytest.raises(StateBusyError):
            verify_target(str(dst), state_dir=str(state))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    checkpoint = json.loads(state_file.read_text())
    assert not checkpoint["complete"] and 0 < checkpoint["position"] < size

    result = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB)  # the kill freed the lock

    assert result.resumed_from == checkpoint["position"]
    assert result.bytes_total < 30 * MiB  # only what lies past the checkpoint
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == disk_digest(str(src), MiB) == verify_target(str(dst), state_dir=str(state))
    assert inside(extents(dst), extents(src))


class FakeClock:
    """A clock that moves only when someone sleeps on it: the limiter's arithmetic, without timing."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.slept += seconds


def test_the_limiter_asks_for_sleep_in_proportion_to_the_bytes() -> None:
    clock = FakeClock()
    pacer = Pacer(8e6, burst=0.1, clock=clock.now, sleep=clock.sleep)

    for _ in range(100):  # 20 MB written as fast as the writer can: it must wait 2.5 s in all
        clock.sleep(max(0.0, pacer.delay_after(200_000)))
    assert clock.slept == pytest.approx(20e6 / 8e6, rel=1e-9)

    clock.t += 60  # a minute with nothing to write buys at most `burst` seconds of credit
    assert pacer.delay_after(1_600_000) == pytest.approx(0.2 - 0.1, rel=1e-9)
    assert Pacer(None).delay_after(10**12) == 0.0


def test_it_honours_the_bandwidth_limit(disk: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst, state = disk
    make_image(src, 64 * MiB, {0: rand(10 * MiB, 1), 40 * MiB: rand(10 * MiB, 2)})
    clock = FakeClock()
    monkeypatch.setattr(engine, "Pacer", functools.partial(Pacer, clock=clock.now, sleep=clock.sleep))

    result = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, bandwidth_limit_bps=8e6)

    assert result.bytes_written == 20 * MiB
    assert clock.slept == pytest.approx(20 * MiB / 8e6, rel=1e-6)  # every byte paid for, none twice
    assert dst.read_bytes() == src.read_bytes()


def test_progress_is_reported_at_a_bounded_rate_with_a_final_call(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 32 * MiB, {0: rand(12 * MiB, 1)})
    calls: list[tuple[float, Progress]] = []

    started = time.monotonic()
    result = full_copy(
        str(src),
        str(dst),
        state_dir=str(state),
        block_size=MiB,
        bandwidth_limit_bps=10e6,
        progress=lambda p: calls.append((time.monotonic(), p)),
        progress_interval=0.1,
    )
    elapsed = time.monotonic() - started

    assert len(calls) >= 5
    assert len(calls) <= elapsed / 0.1 + 3
    assert all(
        b[0] - a[0] >= 0.09 for a, b in zip(calls[:-2], calls[1:-1], strict=False)
    ), "calls closer than the interval"
    final = calls[-1][1]
    assert final.bytes_done == final.bytes_total == result.bytes_total == 12 * MiB
    assert final.bytes_written == 12 * MiB and final.eta_seconds == 0
    middle = [p for _, p in calls if 0 < p.bytes_done < p.bytes_total]
    assert middle and all(p.rate_bps > 0 and p.eta_seconds is not None for p in middle)
    done = [p.bytes_done for _, p in calls]
    assert done == sorted(done)


def test_a_callback_that_raises_stops_the_copy_and_keeps_the_checkpoint(
    disk: tuple[Path, Path, Path],
) -> None:
    src, dst, state = disk
    make_image(src, 32 * MiB, {0: rand(24 * MiB, 1)})

    class Stop(Exception):
        pass

    def stop_half_way(p: Progress) -> None:
        if p.bytes_done >= 8 * MiB:
            raise Stop

    with pytest.raises(Stop):
        full_copy(
            str(src),
            str(dst),
            state_dir=str(state),
            block_size=MiB,
            progress=stop_half_way,
            progress_interval=0,
        )
    position = json.loads((state / "state.json").read_text())["position"]
    assert 8 * MiB <= position < 24 * MiB

    result = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB)
    assert result.resumed_from == position
    assert dst.read_bytes() == src.read_bytes()


def test_phase1_allocates_no_more_than_the_source_even_in_small_blocks(tmp_path: Path) -> None:
    # Allocating the target ahead of the writes, block by block (256 KiB here), let the pieces land
    # apart on disk, and a target in more extents than its inode holds needed an extent-tree block the
    # source did not: one 4 KiB block more than the source, now and then.
    for k in range(20):
        src, dst, state = tmp_path / f"s{k}", tmp_path / f"d{k}", tmp_path / f"st{k}"
        make_image(src, 832 * KiB, {0: rand(1, k), 16115: rand(770318, k)})
        full_copy(str(src), str(dst), state_dir=str(state), block_size=256 * KiB, durable=False)
        assert dst.read_bytes() == src.read_bytes()
        assert os.stat(dst).st_blocks <= os.stat(src).st_blocks, k


def test_a_resume_frees_space_allocated_past_the_checkpoint(disk: tuple[Path, Path, Path]) -> None:
    # A range allocated in the target past the checkpoint but never written (by a copy stopped half-way,
    # or by anyone else) reads as zeros and is not data to lseek. The resume must not keep it.
    src, dst, state = disk
    make_image(src, 32 * MiB, {0: rand(8 * MiB, 1), 20 * MiB: rand(MiB, 2)})

    def stop(p: Progress) -> None:
        if p.bytes_done >= 4 * MiB:
            raise TransferCancelled("stop")

    with pytest.raises(TransferCancelled):
        full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, progress=stop, progress_interval=0)
    fd = os.open(dst, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 24 * MiB, 4 * MiB)  # allocated past the checkpoint, never written
    finally:
        os.close(fd)

    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)

    assert dst.read_bytes() == src.read_bytes()
    assert allocated(dst) <= allocated(src)


def test_the_calling_thread_does_unstarted_work_and_blocks_finish_in_order() -> None:
    from failback.transfer.passes import Controls, Hashed, Job, Pass, Work

    caller = threading.current_thread()
    release = threading.Event()
    ran_here: list[int] = []
    finished: list[int] = []

    def first(job: Job, buf: bytearray) -> Work:
        def work() -> Hashed:
            if threading.current_thread() is caller:
                ran_here.append(job.index)
                release.set()
            elif job.index == 0:
                assert release.wait(10), "the calling thread never took work from the pool"
            return Hashed(bytes([job.index]))

        return work

    def finish(job: Job, buf: bytearray, h: Hashed) -> None:
        finished.append(h.leaves[0])

    p = Pass(block_size=4096, controls=Controls(), src_fd=-1)
    p.depth = 3  # the pool's one thread is stuck on block 0 until the calling thread does some work
    p.run((Job(i, i * 4096, 4096, 4096) for i in range(8)), first, finish, 1)

    assert finished == list(range(8))
    assert ran_here


def test_cancel_raises_and_a_later_call_finishes_the_copy(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 32 * MiB, {0: rand(16 * MiB, 1)})
    cancel = threading.Event()

    def cancel_soon(p: Progress) -> None:
        if p.bytes_done >= 4 * MiB:
            cancel.set()

    with pytest.raises(TransferCancelled):
        full_copy(
            str(src),
            str(dst),
            state_dir=str(state),
            block_size=MiB,
            progress=cancel_soon,
            progress_interval=0,
            cancel=cancel,
        )
    result = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB)
    assert result.resumed_from > 0
    assert result.digest == disk_digest(str(src), MiB)


def test_a_completed_copy_is_not_done_twice(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 8 * MiB, {0: rand(MiB, 1)})
    first = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)

    again = full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB)

    assert isinstance(again, CopyResult)
    assert again.bytes_written == 0 and again.resumed_from == 8 * MiB
    assert again.digest == first.digest


def test_a_fresh_copy_discards_what_the_target_held(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 16 * MiB, {MiB: rand(MiB, 1)})
    make_image(dst, 16 * MiB, {0: rand(16 * MiB, 9)})  # stale data everywhere

    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)

    assert dst.read_bytes() == src.read_bytes()
    assert allocated(dst) <= 2 * MiB


def test_an_interrupted_tracked_delta_is_finished_by_the_next_one(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 16 * MiB, {0: rand(16 * MiB, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    patch(src, {MiB: rand(MiB, 2), 8 * MiB: rand(MiB, 3), 14 * MiB: rand(MiB, 4)})
    changed = [(MiB, MiB), (8 * MiB, MiB), (14 * MiB, MiB)]

    def stop(p: Progress) -> None:
        if 0 < p.bytes_done < p.bytes_total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        delta_copy(
            str(src),
            str(dst),
            state_dir=str(state),
            changed_extents=changed,
            progress=stop,
            progress_interval=0,
        )
    result = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=[])  # nothing new

    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == disk_digest(str(src), MiB)


def test_a_delta_stopped_while_punches_wait_leaves_leaves_that_match_the_target(disk: tuple[Path, Path, Path]) -> None:
    """Punches run beside the pass (delta._punch_aside): a pass stopped with some still waiting settles
    them first, so the leaves it keeps say what the target holds, and the next pass finishes the job."""
    src, dst, state = disk
    size = 32 * MiB
    make_image(src, size, {0: rand(size, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    discards = [(i * MiB + 64 * KiB, 128 * KiB) for i in range(32)]  # a punch in every block
    fd = os.open(src, os.O_RDWR)
    try:
        for offset, length in discards:
            assert punch_hole(fd, offset, length)
    finally:
        os.close(fd)

    def stop(p: Progress) -> None:
        if 2 * p.bytes_done >= p.bytes_total > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        delta_copy(
            str(src),
            str(dst),
            state_dir=str(state),
            changed_extents=discards,
            progress=stop,
            progress_interval=0,
            durable=False,
        )
    assert target_untouched(str(dst), state_dir=str(state))  # sealed after the last punch
    verify_target(str(dst), state_dir=str(state))  # raises if a leaf does not match the target
    assert 0 < sum(b - a for a, b in extents(src)) < sum(b - a for a, b in extents(dst))  # stopped midway
    result = delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=[], durable=False)

    assert dst.read_bytes() == src.read_bytes()
    assert extents(dst) == extents(src)
    assert result.digest == disk_digest(str(src), MiB) == verify_target(str(dst), state_dir=str(state))


def test_a_second_pass_on_a_disk_is_refused_while_one_runs_and_the_first_is_unharmed(
    disk: tuple[Path, Path, Path],
) -> None:
    """Two sessions (or a re-delivered task) running passes on one state directory at once would
    interleave their leaves: the engine refuses the second at once, whatever it is, and the one running
    finishes as if alone. Verifications only read, so they share the directory with each other."""
    src, dst, state = disk
    size = 16 * MiB
    make_image(src, size, {0: rand(size, 1)})
    full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB, durable=False)
    patch(src, {k * MiB + 4096: rand(8192, k) for k in range(16)})
    changed = [(k * MiB + 4096, 8192) for k in range(16)]
    refused: list[str] = []

    def meanwhile(p: Progress) -> None:
        if refused or not 0 < p.bytes_done < p.bytes_total:
            return
        before = dst.read_bytes()
        for name, other in (
            ("delta", lambda: delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=None)),
            ("full copy", lambda: full_copy(str(src), str(dst), state_dir=str(state), block_size=MiB)),
            ("verify_changes", lambda: verify_changes(str(src), str(dst), state_dir=str(state))),
            ("verify_target", lambda: verify_target(str(dst), state_dir=str(state))),
        ):
            with pytest.raises(StateBusyError, match=f"another pass is using {state}"):
                other()
            refused.append(name)
        assert dst.read_bytes() == before  # a refused pass touched nothing

    result = delta_copy(
        str(src), str(dst), state_dir=str(state), changed_extents=changed, progress=meanwhile, progress_interval=0
    )

    assert refused == ["delta", "full copy", "verify_changes", "verify_target"]
    assert dst.read_bytes() == src.read_bytes()
    with engine.locked(str(state), exclusive=False):  # a verification shares the directory with another
        proof = verify_changes(str(src), str(dst), state_dir=str(state))
    assert proof.identical and proof.target_digest == result.digest == disk_digest(str(src), MiB)
    assert delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=[]).bytes_written == 0


def test_a_delta_needs_a_completed_full_copy(disk: tuple[Path, Path, Path]) -> None:
    src, dst, state = disk
    make_image(src, 4 * MiB, {0: rand(MiB, 1)})
    make_image(dst, 4 * MiB, {})

    with pytest.raises(TransferStateError):
        delta_copy(str(src), str(dst), state_dir=str(state), changed_extents=None)


def test_a_saved_state_is_written_over_the_one_before_it_and_the_two_names_exchanged(tmp_path):
    """Saving the state creates no file after the second save and frees none: the new state is written
    over the one before it (kept as state.json.tmp) and the names exchanged, so state.json is always one
    whole state, and a shorter state leaves nothing of a longer one behind it."""
    from failback.transfer.blockmap import DiskState, save_state

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    final, tmp = state_dir / "state.json", state_dir / "state.json.tmp"
    state = DiskState(size=8 << 20, block_size=1 << 20, grain=64 << 10, dst_dev=1, dst_ino=2)
    save_state(str(state_dir), state, durable=False)
    long = DiskState(**{**state.__dict__, "pending": [[i, i + 1] for i in range(0, 2000, 2)]})
    save_state(str(state_dir), long, durable=False)
    inodes = {final.stat().st_ino, tmp.stat().st_ino}
    assert DiskState.load(str(state_dir)) == long
    for k, saved in enumerate([state, long, DiskState(**{**state.__dict__, "position": 3 << 20})]):
        before = final.stat().st_ino
        save_state(str(state_dir), saved, durable=k == 2)
        assert DiskState.load(str(state_dir)) == saved
        assert json.loads(final.read_bytes()) == json.loads(json.dumps(saved.__dict__))  # nothing left over
        assert {final.stat().st_ino, tmp.stat().st_ino} == inodes and final.stat().st_ino != before
    assert sorted(p.name for p in state_dir.iterdir()) == ["state.json", "state.json.tmp"]
