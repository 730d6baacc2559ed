"""A replica whose disks change during a failback: the production VM was built with the disks as they were,
and only those are copied, so a switch would lose whatever lies on a grown or added disk. The switch is
refused (no override), and if the change comes after the checks ran, the switch stops with the replica
back on and nothing sent."""

import filecmp

import pytest

from failback import workflow
from failback.choices import Outcome, ReplicaState, SessionStatus
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.models import AuditEvent, FailbackSession

from .helpers import replica_named, start

MiB = 1 << 20


def reload(session):
    return FailbackSession.objects.select_related("replica").get(pk=session.pk)


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_disk_grown_during_phase_1_blocks_the_switch_and_no_override_lets_it_through(lab, operator, admin_user):
    replica = replica_named("app-crm")
    s = start(operator, replica)
    assert reload(s).status == SessionStatus.READY_TO_SWITCH
    disk = s.disks.first()
    lab.extend_disk(replica.vm_id, disk.key, disk.capacity_bytes + 8 * MiB)
    lab.guest_write(replica.vm_id, disk.key, disk.capacity_bytes, b"\x5a" * 65536)  # data in the new space

    found = {c.key: c for c in workflow.switch_checks(reload(s))}["replica_disks"]
    assert found.failed and not found.overridable and "grew from" in found.detail
    with pytest.raises(workflow.Refused, match=f"disk {disk.key} grew from .* cancel this failback"):
        workflow.switch_now(operator, s.pk)
    with pytest.raises(workflow.Refused, match="cannot be overridden"):
        workflow.switch_now(admin_user, s.pk, override_checks=True, reason="the window is closing")

    s = reload(s)
    assert s.status == SessionStatus.READY_TO_SWITCH and s.replica.state == ReplicaState.READY_TO_SWITCH
    assert lab.power_state(replica.vm_id) == POWERED_ON  # the replica serves on, untouched
    refused = AuditEvent.objects.filter(session=s, action="switch", outcome=Outcome.REFUSED)
    assert refused.count() == 2 and {r.actor for r in refused} == {operator, admin_user}
    assert not AuditEvent.objects.filter(session=s, action="override_checks").exists()

    workflow.cancel(operator, s.pk, keep_production_vm=True)  # kept for a retry: but it has the old disk
    with pytest.raises(workflow.Refused, match=f"kept by failback #{s.pk}, but built with .* cannot be reused"):
        start(operator, replica)
    again = start(operator, replica, vm_name="app-crm-prod-2")  # a new failback carries the bigger disk
    workflow.switch_now(operator, again.pk)
    again = reload(again)
    assert again.status == SessionStatus.FAILBACK
    grown = again.disks.get(key=disk.key)
    assert grown.capacity_bytes == disk.capacity_bytes + 8 * MiB
    assert filecmp.cmp(
        lab.disk_path(replica.vm_id, disk.key), lab.disk_path(again.production_vm_id, disk.key), shallow=False
    )


@pytest.mark.django_db(databases="__all__")
def test_a_disk_added_after_the_checks_ran_stops_the_switch_with_the_replica_back_on(
    lab, operator, django_capture_on_commit_callbacks
):
    """The race the pre-switch check cannot close: the switch looks again once the replica is off, and
    fails like any switch that cannot finish (the replica back in Failover, serving)."""
    replica = replica_named("app-erp")
    with django_capture_on_commit_callbacks(execute=True):
        s = start(operator, replica)
    assert reload(s).status == SessionStatus.READY_TO_SWITCH
    with django_capture_on_commit_callbacks() as queued:
        workflow.switch_now(operator, s.pk)  # the checks pass: the switch is queued
    added = lab.add_disk(replica.vm_id, 4 * MiB)  # hot-added before the worker takes the switch
    with django_capture_on_commit_callbacks(execute=True):
        for callback in queued:
            callback()

    s = reload(s)
    assert s.status == SessionStatus.FAILED and s.replica.state == ReplicaState.FAILOVER
    assert f"disk {added} (4.0 MiB) was added" in s.error and "nothing was sent" in s.error
    assert lab.power_state(replica.vm_id) == POWERED_ON  # back on: never both down
    assert lab.power_state(s.production_vm_id) == POWERED_OFF
    failed = AuditEvent.objects.get(session=s, action="fail_switch")
    assert "Switch failed" in failed.detail and "replica powered on" in failed.detail
    assert not AuditEvent.objects.filter(session=s, action="copy_disk", data__phase=2).exists()


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_production_vm_missing_a_disk_blocks_the_switch(lab, operator):
    """The production VM built (or kept from an earlier attempt) must hold every disk the session copies."""
    replica = replica_named("app-crm")
    s = start(operator, replica)
    s = reload(s)
    key = s.disks.first().key
    lab.extend_disk(s.production_vm_id, key, s.disks.first().capacity_bytes + MiB)
    with pytest.raises(workflow.Refused, match=f"the production VM's disk {key} is .*, not "):
        workflow.switch_now(operator, s.pk)
    assert reload(s).status == SessionStatus.READY_TO_SWITCH and lab.power_state(replica.vm_id) == POWERED_ON


def test_the_lab_grows_and_adds_disks_like_vsphere_and_never_shrinks_them(lab):
    vm = lab.create_vm("grower", host="esx-prod-01", datastore="prod-ds-01", disks=[MiB])
    lab.extend_disk(vm, "scsi0:0", 3 * MiB)
    key = lab.add_disk(vm, 2 * MiB)
    disks = {d.key: d.capacity_bytes for d in lab.vm_config(vm).disks}
    assert disks == {"scsi0:0": 3 * MiB, key: 2 * MiB} and key == "scsi0:1"
    with open(lab.disk_path(vm, "scsi0:0"), "rb") as f:
        assert f.seek(0, 2) == 3 * MiB and f.read() == b""
    with pytest.raises(Exception, match="cannot shrink"):
        lab.extend_disk(vm, "scsi0:0", MiB)
