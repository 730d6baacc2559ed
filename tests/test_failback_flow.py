"""Whole failbacks on the lab through the service layer, with django-q2 running the steps inline.

Real sparse disk files move; the assertions are on bytes, states, power and audit rows.
"""

import filecmp
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule
from django_q.scheduler import scheduler

from failback import schedules, watchdog, workflow
from failback.choices import Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.models import AuditEvent, FailbackSession, Replica

from .helpers import replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def reload(session):
    return FailbackSession.objects.select_related("replica").get(pk=session.pk)


def assert_disks_identical(lab, session):
    for disk in session.disks.all():
        src = lab.disk_path(session.replica.vm_id, disk.key)
        dst = lab.disk_path(session.production_vm_id, disk.key)
        assert filecmp.cmp(src, dst, shallow=False), f"disk {disk.key} differs"
        assert disk.verified and disk.source_digest == disk.target_digest != ""


def actions(session):
    return list(AuditEvent.objects.filter(session=session).values_list("action", flat=True))


def test_it_fails_back_automatically_with_byte_identical_disks(lab, operator):
    replica = replica_named("app-crm")  # no guest tools
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO))
    assert session.status == SessionStatus.FAILBACK
    assert session.replica.state == ReplicaState.FAILBACK
    assert lab.power_state(replica.vm_id) == POWERED_OFF
    assert lab.power_state(session.production_vm_id) == POWERED_ON
    assert_disks_identical(lab, session)
    assert session.stop_method == "No guest tools running on the replica: powered off at once"
    assert session.replica_off_at <= session.production_on_at and session.switch_window is not None
    assert actions(session) == [
        "start_failback",
        "begin_phase1",
        "create_production_vm",
        *["copy_disk"] * session.disks.count(),
        "replica_state",
        "finish_phase1",
        "switch",
        "predict_window",
        "stop_replica",
        *["send_changes"] * session.disks.count(),
        "replica_state",
        "finish_switch",
        "power_on_production",
        "switch_window",
    ]
    copy = AuditEvent.objects.filter(session=session, action="copy_disk").first()
    assert copy.data["digest"] and copy.data["bytes_written"] > 0


def test_it_sends_only_what_changed_after_phase1(lab, operator):
    replica = replica_named("app-erp")  # tools, change tracking
    lab.set_vm_options(replica.vm_id, shutdown_seconds=0.3)
    session = reload(start(operator, replica, switch_mode=SwitchMode.MANUAL))
    assert session.status == SessionStatus.READY_TO_SWITCH and session.replica.state == ReplicaState.READY_TO_SWITCH
    assert lab.power_state(replica.vm_id) == POWERED_ON  # users keep working on the replica
    disk = session.disks.first()
    for offset in (0, disk.capacity_bytes // 2 + 4096, disk.capacity_bytes - 65536):
        lab.guest_write(replica.vm_id, disk.key, offset, b"\xa5" * 65536)
    workflow.switch_now(operator, session.pk, reason="CHG-7")
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK
    assert session.stop_method == "Guest OS shut down"
    assert_disks_identical(lab, session)
    disk.refresh_from_db()
    assert disk.method == "tracked" and "Change tracking" in disk.method_reason
    # Exactly the extents change tracking reported (64 KiB granules; the unaligned write spans two).
    assert disk.phase2_bytes_written == 3 * 65536  # the 4 KiB pages that changed, not whole blocks


def test_it_compares_digests_when_change_tracking_is_off(lab, operator):
    replica = replica_named("web-01")
    lab.set_vm_options(replica.vm_id, shutdown_seconds=0.2)
    assert lab.change_tracking(replica.vm_id, lab.vm_config(replica.vm_id).disks[0].key) is None
    session = reload(start(operator, replica, switch_mode=SwitchMode.MANUAL))
    disk = session.disks.first()
    lab.guest_write(replica.vm_id, disk.key, disk.capacity_bytes // 3, b"\x5a" * 4096)
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert_disks_identical(lab, session)
    disk.refresh_from_db()
    assert disk.method == "digest" and "unavailable" in disk.method_reason
    assert disk.phase2_bytes_written > 0


def test_it_powers_off_a_guest_that_hangs_on_shutdown(lab, operator):
    replica = replica_named("db-sql")  # shutdown hangs
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO, shutdown_timeout_s=1))
    assert session.status == SessionStatus.FAILBACK
    assert session.stop_method == "Guest OS did not shut down within 1 s: powered off"
    assert lab.power_state(replica.vm_id) == POWERED_OFF
    assert_disks_identical(lab, session)


def test_it_commits_and_the_production_vm_takes_the_workloads_place(lab, operator):
    replica = replica_named("app-crm")
    session = start(operator, replica, switch_mode=SwitchMode.AUTO)
    workflow.commit(operator, session.pk, reason="app team confirmed")
    session = reload(session)
    assert session.status == SessionStatus.COMMITTED and session.ended_at
    replica = Replica.objects.get(pk=replica.pk)
    assert replica.state == ReplicaState.READY and replica.production_vm_id == session.production_vm_id
    assert lab.power_state(session.production_vm_id) == POWERED_ON
    assert AuditEvent.objects.filter(session=session, action="commit", actor=operator, outcome=Outcome.OK).exists()
    assert AuditEvent.objects.filter(session=session, action="finish_commit", to_state=SessionStatus.COMMITTED).exists()


def test_it_undoes_back_to_the_replica_and_allows_a_new_failback(lab, operator):
    replica = replica_named("app-crm")
    session = start(operator, replica, switch_mode=SwitchMode.AUTO)
    production = reload(session).production_vm_id
    workflow.undo(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.UNDONE
    assert Replica.objects.get(pk=replica.pk).state == ReplicaState.FAILOVER
    assert lab.power_state(replica.vm_id) == POWERED_ON
    assert production not in {vm.vm_id for vm in lab.inventory().vms}  # discarded with its changes
    again = start(operator, replica, switch_mode=SwitchMode.MANUAL)
    assert reload(again).status == SessionStatus.READY_TO_SWITCH


@pytest.mark.django_db(databases="__all__")  # callbacks are held back until the test releases them
def test_it_fails_phase1_with_the_platforms_message_and_leaves_the_replica_running(
    lab, operator, django_capture_on_commit_callbacks
):
    replica = replica_named("app-crm")
    with django_capture_on_commit_callbacks() as queued:
        session = start(operator, replica, vm_name="taken-meanwhile")
    # Someone creates a VM of that name at the platform before the worker gets to it.
    lab.create_vm("taken-meanwhile", host="esx-prod-01", datastore="prod-ds-01", disks=[2**20], networks=["prod-net"])
    with django_capture_on_commit_callbacks(execute=True):
        for callback in queued:
            callback()
    session = reload(session)
    assert session.status == SessionStatus.FAILED and "taken-meanwhile" in session.error
    assert session.replica.state == ReplicaState.FAILOVER
    assert lab.power_state(replica.vm_id) == POWERED_ON
    failed = AuditEvent.objects.get(session=session, action="fail_phase1")
    assert "untouched" in failed.detail and failed.data["error"]
    with django_capture_on_commit_callbacks(execute=True):
        retry = start(operator, replica, vm_name="second-try")
    assert reload(retry).status == SessionStatus.READY_TO_SWITCH


def test_it_switches_once_at_the_scheduled_time(lab, operator):
    replica = replica_named("app-crm")
    when = timezone.now() + timedelta(hours=1)
    session = reload(start(operator, replica, switch_mode=SwitchMode.SCHEDULED, switch_at=when))
    assert session.status == SessionStatus.READY_TO_SWITCH
    schedule = Schedule.objects.get(name=f"failback-switch-{session.pk}")
    assert schedule.next_run == when - schedules.SWITCH_LEAD  # fires early; the task waits for the second
    # Time passes: the session and its schedule are due.
    due = timezone.now() - timedelta(seconds=2)
    FailbackSession.objects.filter(pk=session.pk).update(switch_at=due)
    Schedule.objects.filter(pk=schedule.pk).update(next_run=due)
    scheduler()
    scheduler()
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK
    switch = AuditEvent.objects.get(session=session, action="switch")
    assert switch.actor is None and switch.actor_name == "system" and switch.data["trigger"] == "scheduled"


def test_it_moves_the_schedule_when_the_switch_time_changes(lab, operator):
    session = start(
        operator,
        replica_named("app-crm"),
        switch_mode=SwitchMode.SCHEDULED,
        switch_at=timezone.now() + timedelta(hours=1),
    )
    later = timezone.now() + timedelta(hours=3)
    workflow.schedule_switch(operator, session.pk, later)
    assert Schedule.objects.get(name=f"failback-switch-{session.pk}").next_run == later - schedules.SWITCH_LEAD
    workflow.switch_now(operator, session.pk)
    assert not Schedule.objects.filter(name=f"failback-switch-{session.pk}").exists()  # nothing left to fire
    assert reload(session).status == SessionStatus.FAILBACK


@pytest.mark.django_db(databases="__all__")
def test_it_switches_when_phase1_ends_after_the_scheduled_time(lab, operator, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as queued:
        session = start(
            operator,
            replica_named("app-crm"),
            switch_mode=SwitchMode.SCHEDULED,
            switch_at=timezone.now() + timedelta(hours=1),
        )
    FailbackSession.objects.filter(pk=session.pk).update(
        switch_at=timezone.now() - timedelta(minutes=5)
    )  # phase 1 was slow
    with django_capture_on_commit_callbacks(execute=True):
        for callback in queued:
            callback()
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK
    assert "started when phase 1 ended" in AuditEvent.objects.get(session=session, action="switch").detail


def test_it_finishes_a_switch_whose_worker_died_after_the_replica_went_down(lab, operator, settings):
    settings.FAILBACK_STALL_SECONDS = 2
    replica = replica_named("app-crm")
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH
    lab.guest_write(replica.vm_id, session.disks.first().key, 0, b"last words" * 100)
    # The worker took the switch, stopped the replica, and died before sending the changes.
    workflow.transition(session.pk, "switch", actor=operator, switch_started_at=timezone.now())
    lab.power_off(replica.vm_id)
    stale = timezone.now() - timedelta(seconds=30)
    FailbackSession.objects.filter(pk=session.pk).update(
        replica_stop_started_at=stale, replica_off_at=stale, stop_method="powered off", heartbeat_at=stale
    )
    assert watchdog.recover_stalled() == [session.pk]
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK and session.stop_method == "powered off"
    assert lab.power_state(session.production_vm_id) == POWERED_ON  # not both down
    assert_disks_identical(lab, session)
    assert AuditEvent.objects.get(session=session, action="resume").data["step"] == "phase2"


def switched_but_never_powered_on(lab, operator, replica):
    """A failback as the watchdog finds it when the worker died between "finish switch" and the
    power-on: replica off, production off, no power-on recorded, no heartbeat for 30 s."""
    session = reload(start(operator, replica))
    workflow.switch_now(operator, session.pk)
    lab.power_off(reload(session).production_vm_id)
    stale = timezone.now() - timedelta(seconds=30)
    FailbackSession.objects.filter(pk=session.pk).update(production_on_at=None, heartbeat_at=stale)
    return reload(session)


@pytest.mark.faults
def test_it_powers_production_on_when_the_worker_died_right_after_the_switch(lab, operator, settings):
    settings.FAILBACK_STALL_SECONDS = 2
    replica = replica_named("app-crm")
    session = switched_but_never_powered_on(lab, operator, replica)
    assert lab.power_state(replica.vm_id) == POWERED_OFF
    assert watchdog.recover_stalled() == [session.pk]
    assert watchdog.recover_stalled() == []  # once
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK and session.production_on_at is not None
    assert lab.power_state(session.production_vm_id) == POWERED_ON
    assert AuditEvent.objects.filter(session=session, action="resume").get().data["step"] == "power_on"


@pytest.mark.faults
def test_commit_waits_for_the_production_vm_the_switch_never_powered_on(lab, operator, settings):
    """Found by the workflow model: the worker died between "finish switch" and the power-on, and a
    commit taken before the watchdog's power-on ran ended the failback with both VMs off."""
    settings.FAILBACK_STALL_SECONDS = 2
    replica = replica_named("app-crm")
    session = switched_but_never_powered_on(lab, operator, replica)
    assert not session.may("commit") and "commit" not in session.allowed_actions and session.may("undo")
    client = Client()
    client.force_login(operator)
    page = client.get(reverse("failback:session", args=[session.pk])).content.decode()
    assert f"Commit is offered once production VM {session.vm_name} runs" in page
    assert reverse("failback:action", args=[session.pk, "commit"]) not in page
    assert reverse("failback:action", args=[session.pk, "undo"]) in page

    with pytest.raises(workflow.Refused) as refused:
        workflow.commit(operator, session.pk, reason="keep it")
    assert refused.value.message == (
        f"Commit refused: failback #{session.pk}'s production VM {session.vm_name} has not been powered on since "
        "the switch (the worker powers it on right after the switch, or the watchdog does if that worker stopped). "
        "Commit once it runs; Undo goes back to the replica."
    )
    row = AuditEvent.objects.get(session=session, action="commit")
    assert (row.outcome, row.from_state, row.actor_name) == (Outcome.REFUSED, SessionStatus.FAILBACK, "olivia")
    assert reload(session).status == SessionStatus.FAILBACK

    assert watchdog.recover_stalled() == [session.pk]  # the power-on step runs (inline here)
    assert lab.power_state(session.production_vm_id) == POWERED_ON
    workflow.commit(operator, session.pk, reason="keep it")
    session = reload(session)
    assert session.status == SessionStatus.COMMITTED
    assert (
        "is offered once production VM"
        not in client.get(reverse("failback:session", args=[session.pk])).content.decode()
    )
    assert lab.power_state(session.production_vm_id) == POWERED_ON  # the workload runs
    assert lab.power_state(replica.vm_id) == POWERED_OFF


def test_a_power_on_that_comes_after_an_undo_says_it_did_nothing(lab, operator):
    from failback.jobs.switch import run_power_on

    session = switched_but_never_powered_on(lab, operator, replica_named("app-crm"))
    FailbackSession.objects.filter(pk=session.pk).update(status=SessionStatus.UNDOING)  # an undo came first
    run_power_on(session.pk)
    row = AuditEvent.objects.filter(session=session, action="power_on_production").order_by("-id").first()
    assert (row.outcome, row.detail) == (Outcome.INFO, f"Power-on not run: failback #{session.pk} is Undoing")


def test_a_guest_that_finishes_its_shutdown_at_the_limit_is_shut_down_not_a_failed_switch(lab, operator):
    """The platform refuses the power-off at the limit because the guest just went off: the switch goes on."""
    from failback.jobs.switch import _stop_replica

    replica = replica_named("app-erp")  # guest tools running
    session = reload(start(operator, replica))
    lab.set_vm_options(replica.vm_id, shutdown_seconds=0.0)
    # The limit has passed already (a resumed switch): the power-off comes before any look at the guest.
    session.replica_stop_started_at = timezone.now() - timedelta(seconds=session.shutdown_timeout_s + 1)
    how = _stop_replica(None, session, lab)
    assert how == f"Guest OS shut down at the {session.shutdown_timeout_s} s limit"
    assert lab.power_state(replica.vm_id) == POWERED_OFF
