"""Who may touch a VM: a failback reserves its VM name, proves which VM it created, and cleans up only that.

Regression tests for issue 11's defects 1 and 2: each failed before the fix (a second failback's clean-up
deleted the first one's VM found by name; an undo with the production VM gone looped forever).
"""

from contextlib import closing

import pytest
from django.db import IntegrityError, transaction

from failback import jobs, watchdog, workflow
from failback.choices import Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.hypervisors.registry import hypervisor_for
from failback.models import AuditEvent, FailbackSession, Replica

from .helpers import network_map, replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def reload(session):
    return FailbackSession.objects.select_related("replica").get(pk=session.pk)


def vm_ids(lab):
    return {vm.vm_id for vm in lab.inventory().vms}


@pytest.mark.django_db(databases="__all__")
def test_it_reserves_the_vm_name_of_an_active_failback(lab, operator, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():  # neither VM exists yet: only the reservation can tell
        first = start(operator, replica_named("app-crm"), vm_name="shared-name")
    with pytest.raises(workflow.Refused, match=f"'shared-name' is reserved by failback #{first.pk}"):
        start(operator, replica_named("app-erp"), vm_name="shared-name")
    refused = AuditEvent.objects.get(action="start_failback", outcome=Outcome.REFUSED)
    assert "reserved" in refused.detail and refused.actor == operator
    assert FailbackSession.objects.filter(vm_name="shared-name").count() == 1


def test_the_database_refuses_a_second_active_session_with_the_same_name(lab, operator):
    first = start(operator, replica_named("app-crm"), vm_name="shared-name")
    other = Replica.objects.exclude(pk=first.replica_id).first()
    with pytest.raises(IntegrityError), transaction.atomic():  # the constraint, whatever a race lets through the checks
        FailbackSession.objects.create(
            replica=other,
            vm_name="shared-name",
            name_scope=first.name_scope,
            target_host="esx-prod-01",
            target_datastore="prod-ds-01",
            shutdown_timeout_s=5,
            started_by=operator,
        )


def test_a_name_is_free_again_once_its_failback_ended(lab, operator):
    first = start(operator, replica_named("app-crm"), vm_name="shared-name")
    workflow.cancel(operator, first.pk)
    second = start(operator, replica_named("app-erp"), vm_name="shared-name")
    assert reload(second).status == SessionStatus.READY_TO_SWITCH


@pytest.mark.django_db(databases="__all__")
def test_a_failed_create_never_deletes_a_vm_found_by_name(lab, operator, django_capture_on_commit_callbacks):
    """Before the fix: the clean-up looked the VM up by name and deleted someone else's VM."""
    replica = replica_named("app-crm")
    with django_capture_on_commit_callbacks() as queued:
        session = start(operator, replica, vm_name="someone-elses")
    theirs = lab.create_vm(
        "someone-elses", host="esx-prod-01", datastore="prod-ds-01", disks=[2**20], networks=["prod-net"], power_on=True
    )
    with django_capture_on_commit_callbacks(execute=True):
        for callback in queued:
            callback()
    session = reload(session)
    assert session.status == SessionStatus.FAILED and "already exists" in session.error
    assert theirs in vm_ids(lab) and lab.power_state(theirs) == POWERED_ON  # untouched
    assert not AuditEvent.objects.filter(session=session, action="delete_production_vm", outcome=Outcome.OK).exists()


def test_a_switched_failbacks_vm_survives_another_sessions_clean_up(lab, operator):
    """The reported case: a switched failback lost its production VM to another session's clean-up."""
    serving = start(operator, replica_named("app-crm"), vm_name="web-prod", switch_mode=SwitchMode.AUTO)
    serving = reload(serving)
    assert serving.status == SessionStatus.FAILBACK
    # A session that claims the same name (created before the reservation existed) fails and cleans up.
    other = replica_named("app-erp")
    loser = FailbackSession.objects.create(
        replica=other,
        vm_name="web-prod",
        name_scope="legacy",
        owner_tag="another-tag",
        target_host="esx-prod-01",
        target_datastore="prod-ds-01",
        shutdown_timeout_s=5,
        started_by=operator,
        network_map=network_map(other),
        status=SessionStatus.QUEUED,
    )
    jobs.run_phase1(loser.pk)
    assert reload(loser).status == SessionStatus.FAILED
    assert lab.power_state(serving.production_vm_id) == POWERED_ON  # the workload is still served
    assert serving.production_vm_id in vm_ids(lab)


def test_clean_up_finds_a_vm_whose_create_answer_was_lost_by_its_owner_tag(lab, operator):
    replica = replica_named("app-crm")
    session = start(operator, replica, vm_name="lost-answer", switch_mode=SwitchMode.MANUAL)
    session = reload(session)
    lost = session.production_vm_id
    FailbackSession.objects.filter(pk=session.pk).update(production_vm_id="")  # as if the answer never came
    with closing(hypervisor_for(replica)) as hv:
        assert hv.find_owned_vm(session.owner_tag) == lost
        jobs._discard_production_vm(reload(session), hv)
    assert lost not in vm_ids(lab)
    assert "owner tag" in AuditEvent.objects.get(session=session, action="delete_production_vm").detail


def test_the_switch_checks_fail_when_the_production_vm_is_missing_or_not_this_failbacks(lab, operator):
    replica = replica_named("app-crm")
    session = reload(start(operator, replica, vm_name="checked"))
    lab.delete_vm(session.production_vm_id)
    with pytest.raises(
        workflow.Refused, match="Production VM is this failback's: Production VM checked .* no longer exists"
    ):
        workflow.switch_now(operator, session.pk)
    impostor = lab.create_vm_like(
        replica.vm_id,
        name="checked",
        host="esx-prod-01",
        datastore="prod-ds-01",
        network_map=network_map(replica),
        owner_tag="not-ours",
    )
    FailbackSession.objects.filter(pk=session.pk).update(production_vm_id=impostor)
    with pytest.raises(workflow.Refused, match="is not the one failback"):
        workflow.switch_now(operator, session.pk)
    assert reload(session).status == SessionStatus.READY_TO_SWITCH
    assert lab.power_state(replica.vm_id) == POWERED_ON


def test_undo_brings_the_replica_back_when_the_production_vm_is_gone(lab, operator):
    """Before the fix: NotFound on the production VM failed the undo, and the watchdog re-queued it forever."""
    replica = replica_named("app-crm")
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO))
    lab.power_off(session.production_vm_id)
    lab.delete_vm(session.production_vm_id)
    workflow.undo(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.UNDONE
    assert session.replica.state == ReplicaState.FAILOVER
    assert lab.power_state(replica.vm_id) == POWERED_ON
    finish = AuditEvent.objects.get(session=session, action="finish_undo")
    assert "no longer exists" in finish.detail and "replica powered on" in finish.detail


def test_undo_stops_after_its_attempts_with_an_act_by_hand_failure(lab, operator, settings):
    settings.FAILBACK_STALL_SECONDS = 0
    replica = replica_named("app-crm")
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO))
    vm_file = lab._vm_file(replica.vm_id)
    backup = vm_file.read_bytes()
    vm_file.unlink()  # the replica VM is unknown to the platform: every power-on attempt fails
    try:
        workflow.undo(operator, session.pk)
        for _ in range(jobs.UNDO_ATTEMPTS + 2):  # the watchdog's rounds
            watchdog.recover_stalled()
    finally:
        vm_file.write_bytes(backup)
    session = reload(session)
    assert session.status == SessionStatus.FAILED
    assert (
        AuditEvent.objects.filter(session=session, action="undo", outcome=Outcome.FAILED).count()
        == jobs.UNDO_ATTEMPTS - 1
    )
    failed = AuditEvent.objects.get(session=session, action="fail_undo")
    assert "power it on by hand" in failed.detail
    assert AuditEvent.objects.filter(session=session, action="resume").count() == jobs.UNDO_ATTEMPTS - 1
    assert lab.power_state(session.production_vm_id) == POWERED_OFF  # production went off first: never both serving
