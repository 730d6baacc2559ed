"""Generated image shapes and change patterns through phase 1 and a delta (both methods): the target is
byte-identical, never more allocated than the source, written no more than the change rounded up to
pages, and a corrupted target grain is always caught. Small images, so the file runs in seconds."""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failback.transfer import VerificationError, delta_copy, disk_digest, full_copy, verify_changes, verify_target
from failback.transfer.phase1 import _empty_copied_grains

from .fs_support import data_sectors

KiB = 1 << 10
PAGE = 4 * KiB
BLOCK = 256 * KiB  # four 64 KiB grains: small images still cross blocks and grains
FAST = settings(
    max_examples=int(os.environ.get("PROPS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass
class Write:
    offset: int
    length: int
    kind: str  # "random" | "zeros" | "same" (rewrites what is there)


@st.composite
def images(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, str]]]:
    """(size, [(offset, length, kind)]): holes, random runs, allocated zeros, dense stretches."""
    size = draw(st.integers(1, 24)) * 64 * KiB + draw(st.sampled_from([0, 0, 1, 4095, PAGE, 12345]))
    runs = draw(
        st.lists(
            st.tuples(st.integers(0, size - 1), st.integers(1, 300 * KiB), st.sampled_from(["random", "zeros"])),
            max_size=6,
        )
    )
    return size, [(o, min(n, size - o), k) for o, n, k in runs]


@st.composite
def changes(draw: st.DrawFn, size: int) -> list[Write]:
    aligned = draw(st.booleans())
    out = []
    for _ in range(draw(st.integers(0, 8))):
        if aligned:
            pages = max(1, size // PAGE)
            offset = draw(st.integers(0, pages - 1)) * PAGE
            length = draw(st.integers(1, 4)) * PAGE
        else:
            offset = draw(st.integers(0, size - 1))
            length = draw(st.integers(1, 20 * KiB))
        length = min(length, size - offset)
        out.append(Write(offset, length, draw(st.sampled_from(["random", "random", "zeros", "same"]))))
    return out


def make(path: str, size: int, runs: list[tuple[int, int, str]], rng: random.Random) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for o, n, kind in runs:
            f.seek(o)
            f.write(rng.randbytes(n) if kind == "random" else bytes(n))
        f.flush()
        os.fsync(f.fileno())  # as a guest's writes are by the time a pass seals the disk: see apply


def apply(path: str, writes: list[Write], rng: random.Random) -> None:
    with open(path, "r+b") as f:
        for w in writes:
            if w.kind == "same":
                f.seek(w.offset)
                data = f.read(w.length)
            else:
                data = rng.randbytes(w.length) if w.kind == "random" else bytes(w.length)
            f.seek(w.offset)
            f.write(data)
        # Flushed, as a powered-off guest's writes are: ext4 allocating them after the delta sealed the
        # source (an extent-tree block counts in st_blocks) broke the seal now and then.
        f.flush()
        os.fsync(f.fileno())


def changed_pages(before: bytes, after: bytes) -> int:
    """Bytes of the 4 KiB pages whose content differs: what a perfect delta must write at most."""
    return sum(
        min(PAGE, len(after) - o) for o in range(0, len(after), PAGE) if before[o : o + PAGE] != after[o : o + PAGE]
    )


def allocated(path: str) -> int:
    return data_sectors(path) * 512  # without ext4's extent-tree blocks (tests/fs_support.py)


def run_case(work: str, image: tuple[int, list[tuple[int, int, str]]], writes: list[Write], tracked: bool, seed: int):
    rng = random.Random(seed)
    src, dst, state = (os.path.join(work, n) for n in ("src.img", "dst.img", "state"))
    size, runs = image
    make(src, size, runs, rng)
    first = full_copy(src, dst, state_dir=state, block_size=BLOCK, durable=False)
    with open(dst, "rb") as f:
        assert f.read() == open(src, "rb").read()
    assert allocated(dst) <= allocated(src)
    assert first.digest == disk_digest(src)

    before = open(src, "rb").read()
    apply(src, writes, rng)
    after = open(src, "rb").read()
    extents = [(w.offset, w.length) for w in writes] if tracked else None
    result = delta_copy(src, dst, state_dir=state, changed_extents=extents, durable=False)
    return src, dst, state, before, after, result


@FAST
@given(image=images(), data=st.data(), tracked=st.booleans(), seed=st.integers(0, 2**32))
def test_a_delta_leaves_the_target_identical_sparse_and_writes_only_changed_pages(
    image: tuple[int, list[tuple[int, int, str]]], data: st.DataObject, tracked: bool, seed: int
) -> None:
    writes = data.draw(changes(image[0]))
    with tempfile.TemporaryDirectory(prefix="transfer-props-") as work:
        check_delta(work, image, writes, tracked, seed)


def check_delta(
    work: str, image: tuple[int, list[tuple[int, int, str]]], writes: list[Write], tracked: bool, seed: int
) -> None:
    src, dst, state, before, after, result = run_case(work, image, writes, tracked, seed)
    assert open(dst, "rb").read() == after
    assert allocated(dst) <= allocated(src)
    assert result.bytes_written <= changed_pages(before, after)
    proof = verify_changes(src, dst, state_dir=state, samples=4)
    assert proof.identical and proof.target_sealed and proof.source_sealed
    assert proof.target_digest == result.digest == disk_digest(src) == verify_target(dst, state_dir=state)


@FAST
@given(image=images(), data=st.data(), tracked=st.booleans(), seed=st.integers(0, 2**32))
def test_a_corrupted_target_grain_is_always_caught(
    image: tuple[int, list[tuple[int, int, str]]], data: st.DataObject, tracked: bool, seed: int
) -> None:
    writes = data.draw(changes(image[0]))
    offset = data.draw(st.integers(0, image[0] - 1))
    with tempfile.TemporaryDirectory(prefix="transfer-props-") as work:
        check_corruption(work, image, writes, tracked, seed, offset)


def check_corruption(
    work: str, image: tuple[int, list[tuple[int, int, str]]], writes: list[Write], tracked: bool, seed: int, offset: int
) -> None:
    src, dst, state, _, after, _ = run_case(work, image, writes, tracked, seed)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(bytes([after[offset] ^ 0x5A]))

    # Through the filesystem: the seal breaks, the switch's verification re-reads and sees it.
    proof = verify_changes(src, dst, state_dir=state, samples=0)
    assert not proof.target_sealed and not proof.identical
    # Below the filesystem (seal kept): the full verification still names the grain.
    with open(os.path.join(state, "state.json")) as f:
        saved = json.load(f)
    st_ = os.stat(dst)
    saved["target_seal"] = [st_.st_size, st_.st_blocks, st_.st_mtime_ns, st_.st_ctime_ns]
    with open(os.path.join(state, "state.json"), "w") as f:
        json.dump(saved, f)
    with pytest.raises(VerificationError) as caught:
        verify_target(dst, state_dir=state)
    assert caught.value.offset == offset - offset % (64 * KiB)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 64).flatmap(
        lambda n: st.tuples(
            st.lists(
                st.sampled_from([bytes(16), b"\0" * 15 + b"\1", b"\1" + b"\0" * 15, b"\0" * 8 + b"\2" * 8]),
                min_size=n,
                max_size=n,
            ),
            st.lists(st.tuples(st.integers(0, n * 4), st.integers(1, n * 4)), max_size=6),
        )
    )
)
def test_phase1_finds_exactly_the_copied_grains_whose_leaf_is_zero(case):
    """The search in C for copied grains found empty (phase 1 punches them) gives the grains the data
    ranges touch whose leaf is the zero leaf, in order, once each: zeros that straddle two leaves, a
    grain shared by two ranges and grains outside every range included."""
    leaves, raw = case
    g_size = 4  # bytes per grain here: the search only needs the ratio of ranges to grains
    n = len(leaves)
    segments, at = [], 0
    for gap, length in raw:  # sorted, disjoint ranges within the block
        a = at + gap
        b = min(a + length, n * g_size)
        if a >= b:
            break
        segments.append((a, b))
        at = b
    blob = b"".join(leaves)
    expected = [
        k
        for k in range(n)
        if leaves[k] == bytes(16) and any(a < (k + 1) * g_size and b > k * g_size for a, b in segments)
    ]
    assert list(_empty_copied_grains(blob, tuple(segments), g_size)) == expected
