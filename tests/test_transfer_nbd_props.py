"""The delta's invariants over NBD, on generated images and rounds of change (the strategies of
test_transfer_delta_props.py): both disks are nbdkit exports on Unix sockets, so the NBD paths run:
reads asked ahead for the blocks of the window, writes and zeroings confirmed and read back in
batches, block status for holes, cancelled passes with requests in flight.

After every round the production disk is byte-identical to the replica, allocates nothing where the
replica has a hole and no more data than it; a round not cancelled wrote no more than the 4 KiB pages
whose content changed, and a quiet tracked round read the production disk no more than twice its named
pages plus the grains it zeroed (over NBD a zeroed range is read back, one round trip for the batch,
where direct mode asks the file for its holes). The proof then holds, and a full re-read agrees."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from failback.transfer import disk_digest, full_copy, verify_changes, verify_target
from failback.transfer.nbd import release

from .nbd_support import require_nbd, served
from .test_transfer_delta_props import (
    PROPS,
    allocated_in_holes,
    apply,
    blocks,
    changed_pages,
    grains_touched,
    images,
    make,
    pages_named,
    read,
    replica_reads,
    rounds,
    send,  # a delta_copy of paths or NBD URIs alike
)

pytestmark = pytest.mark.nbd


@pytest.fixture(scope="module")
def exports() -> Iterator[tuple[str, str, str, str, str]]:
    """(replica file, production file, their URIs, a work directory): one nbdkit each for the module,
    serving files that every example rewrites in place (same inode)."""
    require_nbd()
    with tempfile.TemporaryDirectory(prefix="transfer-nbd-props-") as work:
        src, dst = os.path.join(work, "src.img"), os.path.join(work, "dst.img")
        for path in (src, dst):
            open(path, "wb").close()
        with (
            served(src, readonly=True, certs=None, workdir=work) as s,
            served(dst, readonly=False, certs=None, workdir=work) as d,
        ):
            yield src, dst, s.uri, d.uri, work


def resize_in_place(path: str, size: int) -> None:
    """Empty the file and give it ``size`` bytes of hole, keeping its inode (nbdkit keeps it open)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@PROPS
@given(image=images(), data=st.data(), seed=st.integers(0, 2**32))
def test_over_nbd_deltas_write_only_changed_pages_and_keep_every_hole(exports, image, data, seed) -> None:
    src, dst, s_uri, d_uri, work = exports
    plan = data.draw(rounds(image))
    rng = random.Random(seed)
    block, size, runs = image
    for uri in (s_uri, d_uri):
        release(uri)  # pooled connections know the last example's size
    make(src, size, runs, rng)  # "wb": the same inode, truncated
    resize_in_place(dst, size)
    with tempfile.TemporaryDirectory(dir=work) as state:
        first = full_copy(s_uri, d_uri, state_dir=state, block_size=block, durable=False)
        assert read(dst) == read(src) and first.digest == disk_digest(src)
        for r in plan:
            before = read(src)
            apply(src, r.changes, rng)
            result = send(s_uri, d_uri, state, r)
            after = read(src)
            assert read(dst) == after
            assert allocated_in_holes(dst, src) == 0
            assert blocks(dst) <= blocks(src)
            if r.cancel_after is None:
                assert result.bytes_written <= changed_pages(before, after)
                if r.tracked and r.quiet:
                    bound = 2 * pages_named(r.changes, size) + grains_touched(r.changes, size)
                    assert result.target_bytes_read <= bound
                    assert result.bytes_read <= replica_reads(r.changes, before)
            assert result.digest == result.source_digest == disk_digest(src)
        proof = verify_changes(s_uri, d_uri, state_dir=state, samples=4)
        assert proof.identical and proof.source_sealed and proof.target_sealed
        assert proof.target_digest == verify_target(dst, state_dir=state)
