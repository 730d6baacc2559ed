"""Deltas write only what changed and keep holes, on generated images (up to 16 MiB, the engine's
4 MiB blocks or small ones) and generated rounds of change: writes of new data, of zeros, of the same
bytes, and discards (holes punched in the source, as a guest's TRIM does), each round sent by the
tracked or the digest method, some rounds cancelled half-way and sent again. At the moment a round is
cancelled, a second pass on the same disk (a delta, a full copy or a verification) is tried, and must
be refused without touching anything: one pass at a time per state directory.

After every round the target is byte-identical to the source, allocates nothing where the source has
a hole and no more blocks than the source. After a round not cancelled, the delta wrote no more than
the 4 KiB pages whose content changed (so no more than the change rounded up to the 64 KiB grain), and
a tracked delta read from the source only the grains its extents touch. And a corrupted target block
is always caught.

The images are far smaller than one node of the hash tree (4,096 leaves, 256 MiB), so this module runs
the engine with nodes of 2 leaves: every image has up to 128 nodes, and the digest each round ends with,
checked against a full read of the source, is built from the nodes that round moved and those earlier
rounds (cancelled ones included) left."""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failback.transfer import (
    StateBusyError,
    TransferCancelled,
    VerificationError,
    blockmap,
    delta,
    delta_copy,
    disk_digest,
    full_copy,
    verify_changes,
    verify_target,
)
from failback.transfer.sparse import data_extents, punch_hole

from .fs_support import data_sectors

KiB, MiB = 1 << 10, 1 << 20
PAGE, GRAIN = 4 * KiB, 64 * KiB
PROPS = settings(
    max_examples=int(os.environ.get("PROPS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True, scope="module")
def small_nodes():
    before, blockmap.NODE_LEAVES = blockmap.NODE_LEAVES, 2
    yield
    blockmap.NODE_LEAVES = before


@dataclass(frozen=True)
class Change:
    offset: int
    length: int
    kind: str  # "data" | "zeros" | "same" (rewrites what is there) | "discard" (punches a hole)


@dataclass(frozen=True)
class Round:
    changes: tuple[Change, ...]
    tracked: bool
    cancel_after: int | None  # stop the first attempt at this cancel check, then send again
    quiet: bool = False  # nothing writes to the source during the pass (the replica is off)


@st.composite
def images(draw: st.DrawFn) -> tuple[int, int, tuple[tuple[int, int, str], ...]]:
    """(block size, disk size, runs written into a sparse file: (offset, length, kind)); "mixed" is data
    with zeroed pages among it (written, so allocated), as a guest's zeroed blocks are."""
    block = draw(st.sampled_from([4 * MiB, 256 * KiB]))
    size = draw(st.integers(1, 256)) * GRAIN + draw(st.sampled_from([0, 0, 0, 512, PAGE, 12345]))
    size = min(size, 16 * MiB)
    runs = draw(
        st.lists(
            st.tuples(
                st.integers(0, size - 1), st.integers(1, 2 * MiB), st.sampled_from(["data", "mixed", "mixed", "zeros"])
            ),
            max_size=8,
        )
    )
    return block, size, tuple((o, min(n, size - o), kind) for o, n, kind in runs)


@st.composite
def rounds(draw: st.DrawFn, image: tuple[int, int, tuple[tuple[int, int, str], ...]]) -> list[Round]:
    """Rounds of changes, half of them starting inside the image's data (where a discard matters)."""
    _, size, runs = image
    out = []
    for _ in range(draw(st.integers(1, 3))):
        aligned = draw(st.booleans())  # page-aligned changes, as a guest's writes are
        changes = []
        for _ in range(draw(st.integers(0, 10))):
            kind = draw(st.sampled_from(["data", "data", "zeros", "same", "discard"]))
            if runs and draw(st.booleans()):
                o, n, _ = draw(st.sampled_from(runs))
                near = draw(st.integers(o, o + n - 1))
            else:
                near = draw(st.integers(0, size - 1))
            if aligned or kind == "discard":
                offset = near - near % PAGE
                length = draw(st.integers(1, 48)) * PAGE
            else:
                offset = near
                length = draw(st.integers(1, 100 * KiB))
            changes.append(Change(offset, min(length, size - offset), kind))
        cancel = draw(st.none() | st.integers(0, 3))
        out.append(Round(tuple(changes), draw(st.booleans()), cancel, draw(st.booleans())))
    return out


class CancelAt:
    """Says "cancel" from its n-th check on (the engine asks at least once per block). At that moment,
    inside the pass, it first tries ``rival`` (a second pass on the same disk), which must be refused.
    (That the refused pass wrote nothing shows in the round's checks: the target ends as the source,
    and the bytes written stay within the changed pages. Its bytes cannot be compared here: the pass's
    punches of earlier blocks may still be landing.)"""

    def __init__(self, n: int, rival=None) -> None:
        self.left, self.rival = n, rival
        self.refused = 0

    def is_set(self) -> bool:
        self.left -= 1
        if self.left == -1 and self.rival is not None:
            with pytest.raises(StateBusyError, match="one pass at a time"):
                self.rival()
            self.refused += 1
        return self.left < 0


def make(path: str, size: int, runs: tuple[tuple[int, int, str], ...], rng: random.Random) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for o, n, kind in runs:
            f.seek(o)
            data = bytearray(rng.randbytes(n) if kind != "zeros" else bytes(n))
            if kind == "mixed":  # one page in three zeroed (page-aligned in the file)
                for p in range(-(-o // PAGE) * PAGE + PAGE, o + n, 3 * PAGE):
                    data[p - o : p - o + PAGE] = bytes(len(data[p - o : p - o + PAGE]))
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def apply(path: str, changes: tuple[Change, ...], rng: random.Random) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for c in changes:
            if c.kind == "discard":
                assert punch_hole(fd, c.offset, c.length)
                continue
            if c.kind == "data":
                data = rng.randbytes(c.length)
            elif c.kind == "zeros":
                data = bytes(c.length)
            else:
                data = os.pread(fd, c.length, c.offset)
            os.pwrite(fd, data, c.offset)
        # A powered-off guest's writes are on disk: unflushed, ext4 allocates them later, and an
        # extent-tree block that allocation adds changes st_blocks after the delta sealed the source.
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def extents_of(path: str) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def allocated_in_holes(dst: str, src: str) -> int:
    """Bytes dst allocates where src has a hole: a hole of the source the target did not keep."""
    data = extents_of(src)
    return sum((b - a) - sum(max(0, min(b, y) - max(a, x)) for x, y in data) for a, b in extents_of(dst))


def blocks(path: str) -> int:
    return data_sectors(path)  # without ext4's extent-tree blocks (tests/fs_support.py)


def changed_pages(before: bytes, after: bytes) -> int:
    """Bytes of the 4 KiB pages whose content differs: the most a delta may write."""
    return sum(
        min(PAGE, len(after) - o) for o in range(0, len(after), PAGE) if before[o : o + PAGE] != after[o : o + PAGE]
    )


def grains_touched(changes: tuple[Change, ...], size: int) -> int:
    """Bytes of the 64 KiB grains the changes touch: what a tracked delta may read from the source."""
    grains = {g for c in changes if c.length for g in range(c.offset // GRAIN, (c.offset + c.length - 1) // GRAIN + 1)}
    return sum(min(GRAIN, size - g * GRAIN) for g in grains)


def named_pages(changes: tuple[Change, ...]) -> set[int]:
    """Indexes of the 4 KiB pages the changes touch."""
    return {q for c in changes if c.length for q in range(c.offset // PAGE, (c.offset + c.length - 1) // PAGE + 1)}


def pages_named(changes: tuple[Change, ...], size: int) -> int:
    """Bytes of the 4 KiB pages the changes touch. A quiet tracked delta after a pass that finished
    reads those at most twice on the target: to compare them, and to read back what it wrote."""
    return sum(min(PAGE, size - q * PAGE) for q in named_pages(changes))


def replica_reads(changes: tuple[Change, ...], before: bytes) -> int:
    """Bytes a quiet tracked delta after a pass that finished may read on the replica: a touched grain
    whole (its new leaf needs it), but of a grain that was all zeros, only the pages named in it."""
    size, pages, total = len(before), named_pages(changes), 0
    for g in {q * PAGE // GRAIN for q in pages}:
        a, b = g * GRAIN, min((g + 1) * GRAIN, size)
        if any(before[a:b]):
            total += b - a
        else:
            total += sum(min(PAGE, size - q * PAGE) for q in pages if a <= q * PAGE < b)
    return total


def send(src: str, dst: str, state: str, r: Round):
    """One round's delta, cancelled first when the round says so; the result of the pass that ended."""
    extents = [(c.offset, c.length) for c in r.changes] if r.tracked else None
    if r.cancel_after is not None:
        rivals = (
            lambda: delta_copy(src, dst, state_dir=state, changed_extents=extents, durable=False),
            lambda: full_copy(src, dst, state_dir=state, durable=False),
            lambda: verify_changes(src, dst, state_dir=state),
            lambda: verify_target(dst, state_dir=state),
        )
        cancel = CancelAt(r.cancel_after, rivals[r.cancel_after % 4])
        try:
            delta_copy(src, dst, state_dir=state, changed_extents=extents, durable=False, cancel=cancel)
        except TransferCancelled:
            assert cancel.refused == 1  # cancelled at the n-th check: the rival was tried then
    # A tracked pass with the source quiet (as the switch's final delta) compares named pages only.
    return delta_copy(src, dst, state_dir=state, changed_extents=extents, durable=False, source_quiet=r.quiet)


def copy_then_rounds(work: str, image, plan: list[Round], seed: int, check_round=None) -> tuple[str, str, str]:
    rng = random.Random(seed)
    block, size, runs = image
    src, dst, state = (os.path.join(work, n) for n in ("src.img", "dst.img", "state"))
    make(src, size, runs, rng)
    first = full_copy(src, dst, state_dir=state, block_size=block, durable=False)
    assert read(dst) == read(src) and first.digest == disk_digest(src)
    assert allocated_in_holes(dst, src) == 0 and blocks(dst) <= blocks(src)
    for r in plan:
        before = read(src)
        apply(src, r.changes, rng)
        result = send(src, dst, state, r)
        if check_round is not None:
            check_round(src, dst, state, r, before, result)
    return src, dst, state


@PROPS
@given(image=images(), data=st.data(), seed=st.integers(0, 2**32))
def test_it_writes_only_changed_pages_and_keeps_every_hole_round_after_round(image, data, seed) -> None:
    plan = data.draw(rounds(image))

    def check_round(src: str, dst: str, state: str, r: Round, before: bytes, result) -> None:
        after = read(src)
        assert read(dst) == after
        assert allocated_in_holes(dst, src) == 0
        assert blocks(dst) <= blocks(src)
        if r.cancel_after is None:  # a resumed pass may re-send what the cancelled one had sent
            assert result.bytes_written <= changed_pages(before, after)
            if r.tracked:
                assert result.bytes_read <= grains_touched(r.changes, len(after))
                if r.quiet:
                    assert result.target_bytes_read <= 2 * pages_named(r.changes, len(after))
                    assert result.bytes_read <= replica_reads(r.changes, before)
        assert result.digest == result.source_digest == disk_digest(src)

    with tempfile.TemporaryDirectory(prefix="transfer-delta-props-") as work:
        src, dst, state = copy_then_rounds(work, image, plan, seed, check_round)
        proof = verify_changes(src, dst, state_dir=state, samples=4)
        assert proof.identical and proof.source_sealed and proof.target_sealed
        assert proof.target_digest == verify_target(dst, state_dir=state)


@PROPS
@given(image=images(), data=st.data(), seed=st.integers(0, 2**32))
def test_it_always_catches_a_corrupted_target_block(image, data, seed) -> None:
    plan = data.draw(rounds(image))
    size = image[1]
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, min(image[0], size - offset)))
    with tempfile.TemporaryDirectory(prefix="transfer-delta-props-") as work:
        src, dst, state = copy_then_rounds(work, image, plan, seed)
        good = read(dst)
        bad = bytearray(random.Random(seed).randbytes(length))
        bad[0] = good[offset] ^ 0xA5  # the first byte differs for sure
        with open(dst, "r+b") as f:
            f.seek(offset)
            f.write(bad)

        # Through the filesystem: the seal breaks, and the switch's verification re-reads and sees it.
        proof = verify_changes(src, dst, state_dir=state, samples=0)
        assert not proof.target_sealed and not proof.identical
        # The full verification names the first bad grain (it trusts no seal: below the filesystem too).
        with pytest.raises(VerificationError) as caught:
            verify_target(dst, state_dir=state)
        assert caught.value.offset == offset - offset % GRAIN
        # And the next delta repairs it, saying the target had changed.
        result = delta_copy(src, dst, state_dir=state, changed_extents=None, durable=False)
        assert not result.target_untouched
        assert read(dst) == read(src) and result.digest == disk_digest(src)


@PROPS
@given(
    size=st.integers(1, 3 * MiB),
    extents=st.lists(st.tuples(st.integers(0, 3 * MiB + PAGE), st.integers(0, 200 * KiB)), max_size=40),
    bs=st.sampled_from([GRAIN, 256 * KiB, MiB]),
)
def test_changed_extents_become_the_pages_they_touch_cut_at_grains(size: int, extents, bs: int) -> None:
    """A tracked delta's plan: every page an extent touches inside the disk (the short last page
    ending at the disk's end), and no other, once, in runs that stay within a grain, in order."""
    expected = {
        page
        for offset, length in extents
        if min(offset + length, size) > offset
        for page in range(offset // PAGE, -(-min(offset + length, size) // PAGE))
    }
    got: set[int] = set()
    per = bs // GRAIN
    for i, grains in delta._extents_by_grain(extents, size, bs, GRAIN).items():
        assert list(grains) == sorted(grains) and grains
        for k, runs in grains.items():
            assert 0 <= k < per and runs
            for x, y in runs:
                start, end = i * bs + x, i * bs + y
                assert k * GRAIN <= x < y <= (k + 1) * GRAIN
                assert start % PAGE == 0 and (end % PAGE == 0 or end == size) and end <= size
                pages = set(range(start // PAGE, -(-end // PAGE)))
                assert not pages & got
                got |= pages
            assert all(a[1] < b[0] for a, b in zip(runs, runs[1:], strict=False))
    assert got == expected
