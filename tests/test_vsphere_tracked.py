"""Change tracking on vSphere: whole failbacks against vcsim with the project's QueryChangedDiskAreas
(tests/vcsim/cbt.go). The areas the portal asked for are read from the simulator's log; the change IDs
from the session's disks. A change ID that vSphere no longer accepts (change tracking reset on the
replica) makes the switch compare digests instead, and says why."""

import os
import re

import pytest
from pyVmomi import vim

from failback import jobs, workflow
from failback.choices import SessionStatus
from failback.models import AuditEvent

from .test_vsphere_failback import assert_identical, connection, reload, replica, start  # noqa: F401
from .test_vsphere_vcsim import reconfigure

pytestmark = [pytest.mark.vcsim, pytest.mark.django_db(databases="__all__", transaction=True)]

MiB = 1 << 20
BLOCK = 64 * 1024  # the simulator tracks 64 KiB blocks
REFUSED = "A specified parameter was not correct: changeId"  # what vSphere answers for an unknown change ID
QUERY = re.compile(
    r"cbt: QueryChangedDiskAreas vm=(?P<vm>\S+) snapshot=(?P<snapshot>\S+) device=\d+ start=(?P<start>\d+) "
    r'changeId="(?P<change_id>[^"]*)" -> (?:(?P<areas>\d+) areas, (?P<bytes>\d+) bytes|fault (?P<fault>.*))'
)


def queries(vcsim, since=0):
    """The QueryChangedDiskAreas calls the simulator answered, from its log (after ``since`` characters)."""
    return [m.groupdict() for m in QUERY.finditer(vcsim.log()[since:])]


def changed_bytes(asked, snapshot):
    """Bytes reported changed by the calls made on one snapshot (one query, paged by startOffset)."""
    return sum(int(q["bytes"]) for q in asked if q["snapshot"] == snapshot)


def write(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def epoch(change_id):
    return change_id.rsplit("/", 1)[0]


def test_it_switches_with_the_areas_changed_since_phase_1(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    path = hv.disk_path(replica.vm_id, "scsi0:0")
    mark = len(vcsim.log())
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    disk = session.disks.get()
    phase1_id = disk.change_id
    assert disk.method == "full" and re.fullmatch(
        r"([0-9a-f]{2} ){7}[0-9a-f]{2}-([0-9a-f]{2} ){7}[0-9a-f]{2}/\d+", phase1_id
    )
    copy = AuditEvent.objects.get(session=session, action="copy_disk")
    assert copy.data["change_id"] == phase1_id  # noted before the copy began
    asked = queries(vcsim, mark)
    # Phase 1 asks "*" of the running VM without a snapshot (whether the platform answers the method at
    # all: vSphere refuses it for a powered-on VM, which still proves the method exists) ...
    assert asked[0]["change_id"] == "*" and asked[0]["snapshot"] == "-" and "Error caused by file" in asked[0]["fault"]
    # ... and every later question is about the changes since its change ID, on a temporary snapshot.
    assert {q["change_id"] for q in asked[1:]} == {phase1_id} and "-" not in {q["snapshot"] for q in asked[1:]}

    write(path, 3 * MiB + 100, os.urandom(10))  # one block
    write(path, 30 * MiB - 1000, os.urandom(BLOCK))  # across two blocks
    mark = len(vcsim.log())
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    asked = [q for q in queries(vcsim, mark) if q["change_id"] != "*"]
    assert asked and {q["change_id"] for q in asked} == {phase1_id}
    last = asked[-1]["snapshot"]  # the switch's own question, paged over the 64 MiB disk 16 MiB at a time
    assert [int(q["start"]) for q in asked if q["snapshot"] == last] == [0, 16 * MiB, 32 * MiB, 48 * MiB]
    assert changed_bytes(asked, last) == 3 * BLOCK
    disk = session.disks.get()
    assert (disk.method, disk.method_reason) == (
        "tracked",
        "Change tracking: 2 extents (192.0 KiB) changed since phase 1 began",
    )
    assert 0 < disk.phase2_bytes_written <= 3 * BLOCK  # only the changed grains were sent
    assert_identical(vcsim, session)
    hv.close()


def test_it_compares_digests_when_change_tracking_was_reset_before_the_switch(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    path = hv.disk_path(replica.vm_id, "scsi0:0")
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    phase1_id = session.disks.get().change_id
    reconfigure(hv, replica.vm_id, vim.vm.ConfigSpec(changeTrackingEnabled=False))  # an admin resets CBT
    reconfigure(hv, replica.vm_id, vim.vm.ConfigSpec(changeTrackingEnabled=True))
    write(path, 7 * MiB, os.urandom(BLOCK))
    mark = len(vcsim.log())
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    refused = [q for q in queries(vcsim, mark) if q["change_id"] == phase1_id]
    assert refused and all(q["fault"].startswith(REFUSED) for q in refused)
    disk = session.disks.get()
    assert disk.method == "digest"
    assert disk.method_reason == (
        f"Change tracking cannot answer for the recorded change ID (Read changed areas of disk scsi0:0 of "
        f"{replica.vm_id}: {REFUSED}): reading the replica once and comparing block digests"
    )
    row = AuditEvent.objects.get(session=session, action="send_changes")
    assert "(digest)" in row.detail
    assert_identical(vcsim, session)
    hv.close()


def test_it_tracks_again_after_a_catch_up_compared_digests_over_a_reset(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    path = hv.disk_path(replica.vm_id, "scsi0:0")
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    phase1_id = session.disks.get().change_id
    reconfigure(hv, replica.vm_id, vim.vm.ConfigSpec(changeTrackingEnabled=False))
    reconfigure(hv, replica.vm_id, vim.vm.ConfigSpec(changeTrackingEnabled=True))
    write(path, 7 * MiB, os.urandom(BLOCK))
    jobs.run_readiness(session.pk, catch_up=True)
    row = AuditEvent.objects.get(session=session, action="catch_up")
    assert row.detail == "Catch-up sync while the replica runs: scsi0:0: 64.0 KiB (digest)"
    new_id = session.disks.get().change_id
    assert new_id and epoch(new_id) != epoch(phase1_id)  # the id of the new tracking epoch

    write(path, 50 * MiB, os.urandom(BLOCK))
    mark = len(vcsim.log())
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    asked = [q for q in queries(vcsim, mark) if q["change_id"] != "*"]
    assert {q["change_id"] for q in asked} == {new_id}
    assert changed_bytes(asked, asked[-1]["snapshot"]) == BLOCK  # only the write after the catch-up
    assert session.disks.get().method == "tracked"
    assert_identical(vcsim, session)
    hv.close()


def test_it_compares_digests_when_the_replica_does_not_track_changes(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    reconfigure(hv, replica.vm_id, vim.vm.ConfigSpec(changeTrackingEnabled=False))
    mark = len(vcsim.log())
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    assert session.disks.get().change_id == ""
    write(hv.disk_path(replica.vm_id, "scsi0:0"), 9 * MiB, os.urandom(BLOCK))
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert queries(vcsim, mark) == []  # nothing asked of a VM whose change tracking is off
    disk = session.disks.get()
    assert disk.method == "digest" and disk.method_reason.startswith("Change tracking unavailable on this VM")
    assert_identical(vcsim, session)
    hv.close()
