"""Every transition of the table, legal and illegal, through the one transition function."""

from datetime import timedelta

import pytest
from django.utils import timezone

from failback import workflow
from failback.choices import TRANSITIONS, Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession, Replica

from .helpers import put_session_in, replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__")

CASES = [(action, status) for action in TRANSITIONS for status in SessionStatus]


@pytest.mark.parametrize("action,status", CASES, ids=[f"{a}-from-{s}" for a, s in CASES])
def test_it_moves_only_along_the_table(lab, operator, action, status):
    session = put_session_in(start(operator, replica_named("")), status)
    spec = TRANSITIONS[action]
    before = AuditEvent.objects.count()
    if status in spec.sources:
        moved = workflow.transition(session.pk, action, actor=operator)
        assert moved.status == spec.target
        assert FailbackSession.objects.get(pk=session.pk).status == spec.target
        if spec.replica_to:
            assert Replica.objects.get(pk=session.replica_id).state == spec.replica_to
        row = AuditEvent.objects.filter(session=session, action=action).get()
        assert (row.from_state, row.to_state, row.outcome, row.actor_name) == (
            status,
            spec.target,
            Outcome.OK,
            "olivia",
        )
    else:
        with pytest.raises(workflow.Refused) as refused:
            workflow.transition(session.pk, action, actor=operator)
        assert "refused" in refused.value.message
        assert FailbackSession.objects.get(pk=session.pk).status == status
        row = AuditEvent.objects.filter(session=session, action=action).get()
        assert row.outcome == Outcome.REFUSED and row.from_state == status and row.detail == refused.value.message
    assert AuditEvent.objects.count() > before


def test_it_starts_a_failback_queued_and_audited(lab, operator):
    replica = replica_named("")
    session = start(operator, replica, switch_mode=SwitchMode.MANUAL, reason="CHG-42")
    assert session.status == SessionStatus.QUEUED
    assert session.started_by == operator
    assert session.disks.count() == replica.disks.count() > 0
    row = AuditEvent.objects.get(action="start_failback")
    assert row.actor == operator and row.outcome == Outcome.OK and row.to_state == SessionStatus.QUEUED
    assert (
        row.data["target_host"] == "esx-prod-01"
        and row.data["switch_mode"] == "manual"
        and row.data["reason"] == "CHG-42"
    )
    assert Replica.objects.get(pk=replica.pk).state == ReplicaState.FAILOVER  # phase 1 is a session marker


def test_it_refuses_a_second_failback_on_the_same_replica(lab, operator):
    replica = replica_named("")
    first = start(operator, replica)
    with pytest.raises(workflow.Refused, match=f"already has failback #{first.pk}"):
        start(operator, replica, vm_name="other-name")
    assert FailbackSession.objects.filter(replica=replica).count() == 1
    assert AuditEvent.objects.filter(action="start_failback", outcome=Outcome.REFUSED).count() == 1


def test_it_refuses_a_failback_of_a_replica_not_in_failover(lab, operator):
    replica = replica_named("")
    Replica.objects.filter(pk=replica.pk).update(state=ReplicaState.READY)
    with pytest.raises(workflow.Refused, match="failback starts only from Failover"):
        start(operator, replica)
    assert not FailbackSession.objects.exists()


def test_it_refuses_a_viewer_and_audits_it(lab, viewer):
    with pytest.raises(workflow.Refused, match="Operator role"):
        start(viewer, replica_named(""))
    row = AuditEvent.objects.get(action="start_failback")
    assert (row.actor, row.action, row.outcome) == (viewer, "start_failback", Outcome.REFUSED)
    assert not FailbackSession.objects.exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"target_host": "esx-nowhere"}, "Unknown target host"),
        ({"target_datastore": "no-such-ds"}, "Unknown target datastore"),
        ({"vm_name": "bad name; rm -rf"}, "production VM name must be"),
        ({"vm_name": ""}, "production VM name must be"),
        ({"switch_mode": "whenever"}, "Unknown switch mode"),
        ({"switch_mode": "scheduled", "switch_at": None}, "needs a date and time"),
        ({"switch_mode": "scheduled", "switch_at": timezone.now() - timedelta(hours=1)}, "is in the past"),
        ({"network_map": {"dr-net": "no-such-net", "dr-dmz": None}}, "Unknown target network"),
        ({"network_map": {}}, "not mapped"),
        ({"reason": "x" * 501}, "reason is too long"),
    ],
)
def test_it_refuses_bad_input_with_a_clear_message(lab, operator, overrides, message):
    with pytest.raises(workflow.Refused, match=message):
        start(operator, replica_named(""), **overrides)
    assert not FailbackSession.objects.exists()
    assert AuditEvent.objects.get(action="start_failback").outcome == Outcome.REFUSED


def test_it_refuses_a_duplicate_production_vm_name(lab, operator):
    existing = lab.inventory().vms[0].name
    with pytest.raises(workflow.Refused, match=rf"A VM named '{existing}' already exists; pick another name"):
        start(operator, replica_named(""), vm_name=existing)  # not a failback's VM: nothing more to say


def test_it_refuses_commit_before_the_switch(lab, operator):
    session = put_session_in(start(operator, replica_named("")), SessionStatus.READY_TO_SWITCH)
    with pytest.raises(workflow.Refused, match="has not switched yet"):
        workflow.commit(operator, session.pk)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.READY_TO_SWITCH


def test_it_refuses_to_switch_twice(lab, operator, django_capture_on_commit_callbacks):
    session = put_session_in(start(operator, replica_named("")), SessionStatus.READY_TO_SWITCH)
    with django_capture_on_commit_callbacks() as queued:
        workflow.switch_now(operator, session.pk)
    assert len([c for c in queued]) >= 1  # phase 2 queued after commit
    with pytest.raises(workflow.Refused, match="has already switched"):
        workflow.switch_now(operator, session.pk)
    assert AuditEvent.objects.filter(action="switch", outcome=Outcome.OK).count() == 1
    assert AuditEvent.objects.filter(action="switch", outcome=Outcome.REFUSED).count() == 1


def test_it_refuses_undo_after_commit(lab, operator):
    session = put_session_in(start(operator, replica_named("")), SessionStatus.COMMITTED)
    with pytest.raises(workflow.Refused, match="has already ended"):
        workflow.undo(operator, session.pk)


def test_it_refuses_actions_on_a_session_that_does_not_exist(lab, operator):
    with pytest.raises(workflow.Refused, match="no failback #9999"):
        workflow.commit(operator, 9999)


def test_it_changes_the_switch_time_until_the_switch_begins(lab, operator):
    session = put_session_in(start(operator, replica_named("")), SessionStatus.READY_TO_SWITCH)
    when = timezone.now() + timedelta(hours=2)
    workflow.schedule_switch(operator, session.pk, when, reason="maintenance window")
    session.refresh_from_db()
    assert (session.switch_mode, session.switch_at) == (SwitchMode.SCHEDULED, when)
    row = AuditEvent.objects.get(action="schedule_switch")
    assert row.data["before"]["switch_mode"] == "manual" and row.data["after"]["switch_at"] == when.isoformat()
    put_session_in(session, SessionStatus.FAILBACK)
    with pytest.raises(workflow.Refused, match="only before the switch begins"):
        workflow.schedule_switch(operator, session.pk, when + timedelta(hours=1))


def test_it_refuses_a_switch_time_in_the_past(lab, operator):
    session = put_session_in(start(operator, replica_named("")), SessionStatus.READY_TO_SWITCH)
    with pytest.raises(workflow.Refused, match="in the past"):
        workflow.schedule_switch(operator, session.pk, timezone.now() - timedelta(minutes=1))
    assert FailbackSession.objects.get(pk=session.pk).switch_mode == SwitchMode.MANUAL
