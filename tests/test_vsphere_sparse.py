"""Sparse after the switch on vSphere: a whole failback against vcsim with guest writes between phase 1
and the switch (scattered pages, a write into a hole, pages overwritten with zeros, data and zeroed
pages discarded), then the allocation of the production disk's flat file against the replica's, as
vcsim keeps them on its local datastore directory.

- Direct transport (the engine reads and writes the flat files): byte-identical, and the production
  disk allocates nothing where the replica has a hole, so never more than the replica, after a tracked
  and after a digest delta.
- Network transport (the datastore HTTP file interface): byte-identical, but every byte of the disk is
  allocated. The interface only takes a whole file by PUT and the server writes the body it receives,
  zeros included (vcsim: os.Create + io.Copy; ESXi likewise), so the holes of the replica cannot be kept
  (on a filesystem that stores the zeros it is given, as ext4 here; a compressing one would differ).
"""

import os
import random

import pytest
from pyVmomi import vim

from failback import connections, workflow
from failback.choices import SessionStatus
from failback.models import Replica, VCenterConnection
from failback.transfer.sparse import punch_hole

from .test_vsphere_failback import assert_identical, connection, reload, start  # noqa: F401
from .test_vsphere_vcsim import reconfigure, resize_disk

pytestmark = [pytest.mark.vcsim, pytest.mark.django_db(databases="__all__", transaction=True)]

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB
CAPACITY = 64 * MiB


def write(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def discard(path, offset, length):
    """What a guest's TRIM/UNMAP does to a thin disk: the range reads as zeros and is no longer allocated."""
    fd = os.open(path, os.O_RDWR)
    try:
        assert punch_hole(fd, offset, length), "this filesystem cannot punch holes"
    finally:
        os.close(fd)


def allocated(path):
    """Bytes the filesystem allocates to the file (st_blocks), what `du` reports."""
    return os.stat(path).st_blocks * 512


def extents(path):
    """The file's data ranges [start, end), from SEEK_DATA/SEEK_HOLE."""
    found, fd = [], os.open(path, os.O_RDONLY)
    try:
        offset, size = 0, os.fstat(fd).st_size
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            offset = os.lseek(fd, data, os.SEEK_HOLE)
            found.append((data, offset))
    finally:
        os.close(fd)
    return found


def outside(inner, outer):
    """Bytes of the ranges ``inner`` that no range of ``outer`` covers."""
    total = 0
    for lo, hi in inner:
        covered = sum(max(0, min(hi, e) - max(lo, s)) for s, e in outer)
        total += hi - lo - covered
    return total


def before_phase_1(path):
    """The replica's data when the failback starts: 7.06 MiB allocated, 1 MiB of it zeros the guest wrote."""
    rng = random.Random(11)
    write(path, 1 * MiB, rng.randbytes(2 * MiB))
    write(path, 8 * MiB, rng.randbytes(PAGE) + bytes(24 * KiB) + rng.randbytes(36 * KiB))  # zeroed pages in a grain
    write(path, 20 * MiB, rng.randbytes(4 * MiB))
    write(path, 40 * MiB, bytes(MiB))  # zeros the guest wrote: allocated, and phase 1 skips them


def between_phase_1_and_the_switch(path):
    """The guest keeps working while the failback waits for its switch."""
    rng = random.Random(12)
    for _ in range(48):  # scattered 4 KiB pages, in data and in holes
        write(path, rng.randrange(0, CAPACITY // PAGE) * PAGE, rng.randbytes(PAGE))
    write(path, 30 * MiB, rng.randbytes(64 * KiB))  # a write into a hole
    write(path, 20 * MiB, bytes(256 * KiB))  # data overwritten with zeros (still allocated on the replica)
    discard(path, 1 * MiB + 512 * KiB, 512 * KiB)  # data discarded
    discard(path, 8 * MiB + PAGE, 24 * KiB)  # the zeroed pages discarded: same bytes, less space ...
    write(path, 8 * MiB + 40 * KiB, rng.randbytes(PAGE))  # ... in a grain the guest also writes to
    discard(path, 40 * MiB, MiB)  # the written zeros discarded
    discard(path, 22 * MiB, 128 * KiB)  # more data discarded


@pytest.fixture
def sparse_replica(connection, vcsim, operator):  # noqa: F811
    """A powered-on thin replica of 64 MiB holding the data of ``before_phase_1``, declared failed over."""
    hv = vcsim.hypervisor()
    source = next(vm for vm in hv.inventory().vms if vm.name == "DC0_H0_VM0")
    vm_id = hv.create_vm_like(
        source.vm_id, name="db-01_replica", host="DC0_H0", datastore="LocalDS_0", network_map={"DC0_DVPG0": "DC0_DVPG0"}
    )
    resize_disk(hv, vm_id, "scsi0:0", CAPACITY)
    before_phase_1(hv.disk_path(vm_id, "scsi0:0"))
    hv.power_on(vm_id)
    hv.close()
    assert connections.sync_inventory(connection.pk) == 1
    replica = Replica.objects.get(name="db-01_replica")
    return workflow.declare_failover(operator, replica.pk, reason="site A lost")


def fail_back(vcsim, operator, replica, *, tracking):
    """Phase 1, the guest's writes, the switch; returns (session, replica flat file, production flat file)."""
    hv = vcsim.hypervisor()  # direct: the test plays the guest on the replica's flat file
    if not tracking:
        reconfigure(hv, replica.vm_id, vim.vm.ConfigSpec(changeTrackingEnabled=False))
    session = reload(start(operator, replica, vm_name="db-01"))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    source = hv.disk_path(replica.vm_id, "scsi0:0")
    between_phase_1_and_the_switch(source)
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert_identical(vcsim, session)
    target = hv.disk_path(session.production_vm_id, "scsi0:0")
    hv.close()
    return session, source, target


@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "digest"])
def test_it_keeps_the_replica_s_holes_in_direct_mode(vcsim, sparse_replica, operator, tracking):
    session, source, target = fail_back(vcsim, operator, sparse_replica, tracking=tracking)
    assert session.disks.get().method == ("tracked" if tracking else "digest")
    # Measured on ext4 (README, vSphere section): replica 5.64 MiB, production 5.39 MiB allocated. The
    # production lacks the 256 KiB of zeros the guest wrote (punched, not written); the engine before
    # its 64 KiB grains (4 MiB digest blocks) left 60 MiB allocated here.
    assert 5 * MiB < allocated(source) < 6 * MiB
    assert outside(extents(target), extents(source)) == 0  # no production data where the replica has a hole
    assert allocated(target) <= allocated(source)


def test_it_allocates_the_whole_disk_in_network_mode(vcsim, sparse_replica, operator, connection):  # noqa: F811
    VCenterConnection.objects.filter(pk=connection.pk).update(transport=VCenterConnection.Transport.NETWORK)
    session, source, target = fail_back(vcsim, operator, sparse_replica, tracking=True)
    disk = session.disks.get()
    assert disk.method == "full" and disk.phase2_bytes_written == CAPACITY  # the whole disk sent again
    assert 5 * MiB < allocated(source) < 6 * MiB
    # The PUT writes every byte it is sent, zeros included: the production disk is fully allocated,
    # holes and discards of the replica lost (about 10x the replica's allocation here).
    assert extents(target) == [(0, CAPACITY)]
    assert allocated(target) >= CAPACITY
