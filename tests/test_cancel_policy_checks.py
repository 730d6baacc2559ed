"""Safe cancel, the commit policy and the pre-failback checks, on the lab through the service layer."""

import filecmp
import hashlib
import threading
from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.conf import Conf
from django_q.models import Schedule

from failback import jobs, tasks, watchdog, workflow
from failback.choices import CommitPolicy, Outcome, ReplicaState, SessionStatus
from failback.hypervisors.base import POWERED_ON
from failback.models import AuditEvent, FailbackSession, Replica, SchedulerClock

from .conftest import wait_for
from .helpers import replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def digests(lab, vm_id, disks):
    out = {}
    for disk in disks:
        with open(lab.disk_path(vm_id, disk.key), "rb") as f:
            out[disk.key] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def session(pk):
    return FailbackSession.objects.select_related("replica").get(pk=pk)


# -- cancel ------------------------------------------------------------------------------------


def big_replica(lab):
    """The lab's largest replica, with 8 MiB of data written on its largest disk (phase 1 has something to do)."""
    replica = max(Replica.objects.all(), key=lambda r: max(d.capacity_bytes for d in r.disks.all()))
    lab.set_vm_options(replica.vm_id, workload=False)
    disk = max(replica.disks.all(), key=lambda d: d.capacity_bytes)
    for offset in range(0, min(disk.capacity_bytes - (1 << 20), 8 << 20), 1 << 20):
        lab.guest_write(replica.vm_id, disk.key, offset, bytes([offset >> 20 | 1]) * (1 << 20))
    return replica, disk


def test_a_cancelled_phase1_leaves_the_replica_byte_identical_and_running(lab, operator, monkeypatch):
    replica, _ = big_replica(lab)  # phase 1 takes seconds at 1 MB/s
    before = digests(lab, replica.vm_id, replica.disks.all())
    monkeypatch.setattr(Conf, "SYNC", False)  # queued, not run: this test plays the worker itself
    s = start(operator, replica, bandwidth_mbps=1)  # 1 MB/s: phase 1 takes long enough to be cancelled
    worker = threading.Thread(target=jobs.run_phase1, args=(s.pk,))
    worker.start()
    wait_for(lambda: session(s.pk).disks.filter(bytes_done__gt=0).exists(), what="phase 1 copying")
    monkeypatch.setattr(Conf, "SYNC", True)  # the cancel step runs inline, and waits for the copy to let go
    workflow.cancel(operator, s.pk, reason="CHG-7 wrong target")
    worker.join(30)
    assert not worker.is_alive()
    s = session(s.pk)
    assert s.status == SessionStatus.CANCELLED and s.ended_at is not None
    assert s.replica.state == ReplicaState.FAILOVER
    assert lab.power_state(replica.vm_id) == POWERED_ON
    assert digests(lab, replica.vm_id, replica.disks.all()) == before
    assert all(vm.vm_id != s.production_vm_id for vm in lab.inventory().vms)  # the half-built VM is gone
    trail = list(AuditEvent.objects.filter(session=s).values_list("action", "outcome"))
    assert ("cancel_phase1", Outcome.OK) in trail and ("finish_cancel", Outcome.OK) in trail
    assert ("fail_phase1", Outcome.OK) not in trail  # a cancel is not a failure
    assert "not touched" in AuditEvent.objects.get(session=s, action="finish_cancel").detail


def test_a_retry_reuses_the_kept_production_vm_and_sends_only_what_differs(lab, operator):
    replica, disk = big_replica(lab)
    first = start(operator, replica)
    assert session(first.pk).status == SessionStatus.READY_TO_SWITCH
    full = sum(
        AuditEvent.objects.filter(session=first, action="copy_disk").values_list("data__bytes_written", flat=True)
    )
    workflow.cancel(operator, first.pk, keep_production_vm=True)
    first = session(first.pk)
    assert first.status == SessionStatus.CANCELLED and first.replica.state == ReplicaState.FAILOVER
    assert any(vm.vm_id == first.production_vm_id for vm in lab.inventory().vms)
    lab.guest_write(replica.vm_id, disk.key, 0, b"\x42" * 65536)  # the replica moved on while nobody watched

    retry = session(start(operator, replica).pk)
    assert retry.reused_from_id == first.pk and retry.production_vm_id == first.production_vm_id
    assert retry.status == SessionStatus.READY_TO_SWITCH
    sent = sum(
        AuditEvent.objects.filter(session=retry, action="copy_disk").values_list("data__bytes_written", flat=True)
    )
    assert 0 < sent <= 4 << 20 < full  # one changed 4 MiB block, not the whole disk again
    assert {d.method for d in retry.disks.all()} == {"digest"}
    workflow.switch_now(operator, retry.pk)
    retry = session(retry.pk)
    assert retry.status == SessionStatus.FAILBACK
    for d in retry.disks.all():
        assert filecmp.cmp(
            lab.disk_path(replica.vm_id, d.key), lab.disk_path(retry.production_vm_id, d.key), shallow=False
        )


@pytest.mark.parametrize("keep", [False, True])
def test_cancelling_a_queued_retry_decides_the_fate_of_the_vm_it_reuses(lab, operator, monkeypatch, keep):
    """Found by the model test: a queued retry cancelled with "delete" left the reused VM behind ("nothing was built")."""
    replica, _ = big_replica(lab)
    first = start(operator, replica)
    workflow.cancel(operator, first.pk, keep_production_vm=True)
    kept = session(first.pk).production_vm_id
    with monkeypatch.context() as m:
        m.setattr("failback.schedules.async_task", lambda *a, **k: None)  # no worker takes the retry's phase 1
        retry = start(operator, replica)
    assert session(retry.pk).status == SessionStatus.QUEUED and session(retry.pk).production_vm_id == kept
    workflow.cancel(operator, retry.pk, keep_production_vm=keep)
    retry = session(retry.pk)
    assert retry.status == SessionStatus.CANCELLED and retry.replica.state == ReplicaState.FAILOVER
    assert any(vm.vm_id == kept for vm in lab.inventory().vms) == keep
    trail = list(AuditEvent.objects.filter(session=retry).values_list("action", flat=True))
    assert "cancel_reused" in trail and "finish_cancel" in trail


def test_cancel_is_refused_clearly_after_the_switch_and_for_a_viewer(lab, operator, viewer):
    s = start(operator, replica_named("app-crm"))
    with pytest.raises(workflow.Refused, match="Operator role"):
        workflow.cancel(viewer, s.pk)
    workflow.switch_now(operator, s.pk)
    with pytest.raises(workflow.Refused, match="only before the switch.*Undo"):
        workflow.cancel(operator, s.pk)
    assert session(s.pk).status == SessionStatus.FAILBACK
    assert AuditEvent.objects.filter(session=s, action="cancel", outcome=Outcome.REFUSED).count() == 2


# -- commit policy -----------------------------------------------------------------------------


def test_an_auto_commit_counts_down_and_can_be_stopped(lab, operator):
    s = start(operator, replica_named("app-crm"), commit_policy=CommitPolicy.AUTO_COMMIT, commit_after_min=30)
    workflow.switch_now(operator, s.pk)
    s = session(s.pk)
    assert s.status == SessionStatus.FAILBACK and s.policy_counting
    assert abs((s.policy_due_at - timezone.now()) - timedelta(minutes=30)) < timedelta(seconds=30)
    assert Schedule.objects.get(name=f"failback-policy-{s.pk}").next_run == s.policy_due_at
    workflow.stop_commit_policy(operator, s.pk, reason="testing the application first")
    s = session(s.pk)
    assert not s.policy_counting and not Schedule.objects.filter(name=f"failback-policy-{s.pk}").exists()
    tasks.commit_policy(s.pk)  # a late schedule firing anyway changes nothing
    assert session(s.pk).status == SessionStatus.FAILBACK
    with pytest.raises(workflow.Refused, match="already stopped"):
        workflow.stop_commit_policy(operator, s.pk)


def test_an_auto_undo_runs_once_when_due_and_is_audited_as_automatic(lab, operator):
    replica = replica_named("app-crm")
    s = start(operator, replica, commit_policy=CommitPolicy.AUTO_UNDO, commit_after_min=5)
    workflow.switch_now(operator, s.pk)
    FailbackSession.objects.filter(pk=s.pk).update(
        policy_due_at=timezone.now() - timedelta(seconds=1)
    )  # five minutes later
    tasks.commit_policy(s.pk)
    tasks.commit_policy(s.pk)  # delivered twice: still one undo
    s = session(s.pk)
    assert s.status == SessionStatus.UNDONE and s.replica.state == ReplicaState.FAILOVER
    assert lab.power_state(replica.vm_id) == POWERED_ON
    row = AuditEvent.objects.get(session=s, action="undo", outcome=Outcome.OK)
    assert row.actor is None and row.data["trigger"] == "commit_policy" and "Automatic undo" in row.detail


def test_an_auto_commit_waits_for_the_production_vm_the_switch_has_not_powered_on(lab, operator):
    replica = replica_named("app-crm")
    s = start(operator, replica, commit_policy=CommitPolicy.AUTO_COMMIT, commit_after_min=5)
    workflow.switch_now(operator, s.pk)
    lab.power_off(session(s.pk).production_vm_id)  # the worker stopped before the power-on
    FailbackSession.objects.filter(pk=s.pk).update(production_on_at=None, policy_due_at=timezone.now())
    tasks.commit_policy(s.pk)
    assert session(s.pk).status == SessionStatus.FAILBACK
    row = AuditEvent.objects.get(session=s, action="commit")
    assert (
        row.outcome == Outcome.REFUSED
        and row.actor is None
        and "has not been powered on since the switch" in row.detail
    )
    FailbackSession.objects.filter(pk=s.pk).update(production_on_at=timezone.now())  # powered on meanwhile
    tasks.commit_policy(s.pk)
    assert session(s.pk).status == SessionStatus.COMMITTED


def test_a_lost_policy_schedule_still_fires_once_through_the_watchdog(lab, operator):
    s = start(operator, replica_named("app-crm"), commit_policy=CommitPolicy.AUTO_COMMIT, commit_after_min=1)
    workflow.switch_now(operator, s.pk)
    Schedule.objects.filter(name=f"failback-policy-{s.pk}").delete()  # the scheduler lost it (restart, restore)
    FailbackSession.objects.filter(pk=s.pk).update(policy_due_at=timezone.now() - timedelta(minutes=5))
    watchdog.recover_stalled()
    watchdog.recover_stalled()
    assert session(s.pk).status == SessionStatus.COMMITTED
    assert AuditEvent.objects.filter(session=s, action="commit", outcome=Outcome.OK).count() == 1


def test_an_operator_commit_beats_the_policy_and_drops_its_schedule(lab, operator):
    s = start(operator, replica_named("app-crm"), commit_policy=CommitPolicy.AUTO_UNDO, commit_after_min=10)
    workflow.switch_now(operator, s.pk)
    workflow.commit(operator, s.pk)
    assert not Schedule.objects.filter(name=f"failback-policy-{s.pk}").exists()
    FailbackSession.objects.filter(pk=s.pk).update(policy_due_at=timezone.now() - timedelta(seconds=1))
    tasks.commit_policy(s.pk)
    assert session(s.pk).status == SessionStatus.COMMITTED


@pytest.mark.parametrize(
    "policy,minutes,message",
    [
        ("sometimes", 5, "Unknown commit policy"),
        (CommitPolicy.AUTO_COMMIT, None, "needs a delay"),
        (CommitPolicy.AUTO_UNDO, 0, "needs a delay"),
        (CommitPolicy.AUTO_UNDO, 10**6, "needs a delay"),
    ],
)
def test_it_refuses_a_bad_commit_policy(lab, operator, policy, minutes, message):
    replica = replica_named("app-crm")
    with pytest.raises(workflow.Refused, match=message):
        start(operator, replica, commit_policy=policy, commit_after_min=minutes)
    assert not FailbackSession.objects.filter(replica=replica).exists()


# -- pre-failback checks ----------------------------------------------------------------------


def test_a_host_in_maintenance_blocks_the_start_until_an_administrator_overrides(lab, operator, admin_user):
    replica = replica_named("app-crm")
    lab.set_host_state("esx-prod-01", "maintenance")
    with pytest.raises(workflow.Refused, match="esx-prod-01 is in maintenance mode"):
        start(operator, replica)
    with pytest.raises(workflow.Refused, match="Administrator role"):
        start(operator, replica, override_checks=True, reason="needed")
    with pytest.raises(workflow.Refused, match="needs a reason"):
        start(admin_user, replica, override_checks=True)
    assert not FailbackSession.objects.filter(replica=replica).exists()
    s = start(admin_user, replica, override_checks=True, reason="CHG-9 host leaves maintenance in 5 min")
    row = AuditEvent.objects.get(action="override_checks")
    assert row.actor == admin_user and row.data["checks"] and "maintenance" in row.detail
    assert session(s.pk).status == SessionStatus.READY_TO_SWITCH


def test_a_powered_off_replica_and_a_skewed_scheduler_clock_block_the_start(lab, operator):
    replica = replica_named("app-crm")
    lab.power_off(replica.vm_id)
    with pytest.raises(workflow.Refused, match="Replica powered on"):
        start(operator, replica)
    lab.power_on(replica.vm_id)
    now = timezone.now()
    SchedulerClock.objects.create(name="dr_portal", worker_time=now + timedelta(minutes=5), db_time=now)
    with pytest.raises(workflow.Refused, match=r"clock is \+\d+ s off"):
        start(operator, replica)


def test_the_checks_run_again_before_the_switch(lab, operator, admin_user):
    replica = replica_named("app-crm")
    s = start(operator, replica)
    lab.set_host_state("esx-prod-01", "disconnected")
    with pytest.raises(workflow.Refused, match="esx-prod-01 is disconnected"):
        workflow.switch_now(operator, s.pk)
    assert session(s.pk).status == SessionStatus.READY_TO_SWITCH
    assert lab.power_state(replica.vm_id) == POWERED_ON  # nothing was stopped
    workflow.switch_now(admin_user, s.pk, override_checks=True, reason="host is up, the monitoring lags")
    assert session(s.pk).status == SessionStatus.FAILBACK


def test_a_scheduled_switch_blocked_by_a_check_waits_and_says_why(lab, operator):
    replica = replica_named("app-crm")
    s = start(operator, replica, switch_mode="scheduled", switch_at=timezone.now() + timedelta(hours=1))
    FailbackSession.objects.filter(pk=s.pk).update(switch_at=timezone.now() - timedelta(seconds=1))
    lab.set_host_state("esx-prod-01", "maintenance")
    tasks.scheduled_switch(s.pk)
    assert session(s.pk).status == SessionStatus.READY_TO_SWITCH
    row = AuditEvent.objects.filter(session=s, action="switch", outcome=Outcome.REFUSED).get()
    assert "maintenance" in row.detail and row.actor is None
    assert Replica.objects.get(pk=replica.pk).state == ReplicaState.READY_TO_SWITCH
