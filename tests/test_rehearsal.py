"""A failback can be rehearsed again on the lab: Administrators power lab VMs on and off (audited, refused for
everyone else and while a failback owns the VM), and ``seed_lab --reset`` puts the demo lab back as seeded."""

import os

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from failback import rehearsal, workflow
from failback.choices import AuditAction, Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.models import AuditEvent, FailbackSession, Replica

from .helpers import replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def logged_in(user):
    client = Client()
    client.force_login(user)
    return client


def power(client, replica, to):
    return client.post(reverse("failback:lab_power", args=[replica.pk, to]), follow=True).content.decode()


def rows(action, **where):
    return list(AuditEvent.objects.filter(action=action, **where).order_by("id"))


def committed(operator, replica):
    """A whole failback of ``replica``, switched and committed: the replica is Ready and powered off."""
    session = start(operator, replica, switch_mode=SwitchMode.AUTO, vm_name=replica.source_name, shutdown_timeout_s=1)
    workflow.commit(operator, session.pk, reason="rehearsal done")
    session.refresh_from_db()
    assert session.status == SessionStatus.COMMITTED
    return session


def test_it_lets_an_administrator_power_a_lab_replica_off_and_on(lab, admin_user):
    replica = replica_named("web-01")
    client = logged_in(admin_user)

    page = power(client, replica, "off")
    assert lab.power_state(replica.vm_id) == POWERED_OFF
    assert f"{replica.name} is poweredOff." in page
    page = power(client, replica, "on")
    assert lab.power_state(replica.vm_id) == POWERED_ON
    assert f"{replica.name} is poweredOn." in page

    off, on = rows(AuditAction.LAB_POWER_OFF)[-1], rows(AuditAction.LAB_POWER_ON)[-1]
    assert (off.outcome, off.actor_name, off.replica_id) == (Outcome.OK, "ada", replica.pk)
    assert off.data["before"] == POWERED_ON and off.data["after"] == POWERED_OFF
    assert (on.outcome, on.actor_name, on.data["after"]) == (Outcome.OK, "ada", POWERED_ON)
    assert f"Lab VM {replica.name} ({replica.vm_id}) powered on" in on.detail


@pytest.mark.parametrize("who", ["operator", "viewer"])
def test_it_refuses_lab_power_to_anyone_but_an_administrator(lab, who, request):
    user = request.getfixturevalue(who)
    replica = replica_named("web-01")

    page = power(logged_in(user), replica, "off")

    assert lab.power_state(replica.vm_id) == POWERED_ON
    message = f"{user.username} may not power lab VMs on or off: the Administrator role is needed."
    assert message in page
    refused = rows(AuditAction.LAB_POWER_OFF)
    assert [(e.outcome, e.actor_name, e.replica_id, e.detail) for e in refused] == [
        (Outcome.REFUSED, user.username, replica.pk, message)
    ]
    with pytest.raises(workflow.Refused) as raised:  # the service says it too, and tells the API to answer 403
        rehearsal.lab_power(user, replica.pk, "off")
    assert raised.value.forbidden


def test_it_refuses_lab_power_while_a_failback_owns_the_replica(lab, operator, admin_user):
    replica = replica_named("app-crm")
    session = start(operator, replica)  # manual switch: phase 1 runs, then it waits Ready to switch
    session.refresh_from_db()
    assert session.status == SessionStatus.READY_TO_SWITCH

    page = power(logged_in(admin_user), replica, "off")

    assert lab.power_state(replica.vm_id) == POWERED_ON
    assert f"Power off refused: failback #{session.pk} (Ready to switch) owns {replica.name}" in page
    refused = rows(AuditAction.LAB_POWER_OFF)[-1]
    assert (refused.outcome, refused.session_id, refused.replica_id) == (Outcome.REFUSED, session.pk, replica.pk)


def test_it_refuses_what_is_not_a_lab_vm_or_already_in_that_state(lab, admin_user):
    vsphere = Replica.objects.create(
        name="erp_replica", source_name="erp", platform="vsphere", vm_id="vm-42", host="esx"
    )
    with pytest.raises(workflow.Refused, match="erp_replica is on vSphere; the portal powers lab VMs only"):
        rehearsal.lab_power(admin_user, vsphere.pk, "off")
    replica = replica_named("web-01")
    with pytest.raises(workflow.Refused, match=f"Power on refused: {replica.name} .* is already poweredOn"):
        rehearsal.lab_power(admin_user, replica.pk, "on")
    assert [e.outcome for e in rows(AuditAction.LAB_POWER_OFF) + rows(AuditAction.LAB_POWER_ON)] == [
        Outcome.REFUSED,
        Outcome.REFUSED,
    ]


def test_it_shows_the_power_controls_to_administrators_only(lab, operator, admin_user):
    replica = replica_named("web-01")
    url = reverse("failback:lab_power", args=[replica.pk, "off"])
    assert url in logged_in(admin_user).get(reverse("failback:replicas")).content.decode()
    assert url not in logged_in(operator).get(reverse("failback:replicas")).content.decode()


def test_it_declares_failover_again_once_an_administrator_powered_the_replica_on(lab, operator, admin_user):
    replica = replica_named("app-crm")
    committed(operator, replica)
    replica.refresh_from_db()
    assert replica.state == ReplicaState.READY and lab.power_state(replica.vm_id) == POWERED_OFF
    with pytest.raises(workflow.Refused, match="power it on first"):
        workflow.declare_failover(operator, replica.pk)

    page = logged_in(admin_user).get(reverse("failback:replicas")).content.decode()
    assert reverse("failback:lab_power", args=[replica.pk, "on"]) in page
    power(logged_in(admin_user), replica, "on")
    workflow.declare_failover(operator, replica.pk, reason="second rehearsal")

    replica.refresh_from_db()
    assert replica.state == ReplicaState.FAILOVER and lab.power_state(replica.vm_id) == POWERED_ON


def test_it_resets_the_lab_after_a_commit_and_keeps_the_history(lab, operator):
    replica = replica_named("app-crm")
    first = committed(operator, replica)
    production_vm = first.production_vm_id
    assert production_vm in {vm.vm_id for vm in lab.inventory().vms}
    trail_before = list(AuditEvent.objects.order_by("id").values_list("id", "action", "outcome", "detail"))

    out = open(os.devnull, "w")
    call_command("seed_lab", "--count", "4", "--scale", "0.02", "--no-user", "--reset", stdout=out)

    replica.refresh_from_db()
    assert (replica.state, replica.production_vm_id, replica.source_name) == (ReplicaState.FAILOVER, "", "app-crm-01")
    assert lab.power_state(replica.vm_id) == POWERED_ON
    seeded = set(lab.seeded()["replicas"])
    assert {vm.vm_id for vm in lab.inventory().vms} == seeded  # the production VM is gone, the replicas stay
    assert set(lab.power_states().values()) == {POWERED_ON}
    assert FailbackSession.objects.get(pk=first.pk).status == SessionStatus.COMMITTED  # kept as history
    trail_after = list(AuditEvent.objects.order_by("id").values_list("id", "action", "outcome", "detail"))
    assert trail_after[: len(trail_before)] == trail_before  # append-only: nothing changed or deleted
    state_row = rows(AuditAction.REPLICA_STATE, replica=replica)[-1]
    assert (state_row.from_state, state_row.to_state) == (ReplicaState.READY, ReplicaState.FAILOVER)
    assert f"it was protecting production VM {production_vm}" in state_row.detail
    reset = rows(AuditAction.RESET_LAB)[-1]
    assert reset.outcome == Outcome.OK and reset.actor_name == "system"
    assert reset.data["replicas"] == [replica.name] and reset.data["sessions_kept"] == 1
    assert f"app-crm-01 ({production_vm} on esx-prod-01)" in reset.detail

    # The second rehearsal: the same failback, with the same production VM name, goes through again.
    second = committed(operator, replica)
    assert second.pk != first.pk and second.production_vm_id in {vm.vm_id for vm in lab.inventory().vms}


def test_it_resets_an_untouched_lab_without_changing_anything(lab):
    call_command("seed_lab", "--count", "4", "--scale", "0.02", "--no-user", "--reset", stdout=open(os.devnull, "w"))
    reset = rows(AuditAction.RESET_LAB)[-1]
    assert reset.data == {"replicas": [], "powered_on": [], "deleted_vms": [], "sessions_kept": 0}
    assert not rows(AuditAction.REPLICA_STATE)
    assert set(Replica.objects.values_list("state", flat=True)) == {ReplicaState.FAILOVER}


def test_it_refuses_the_reset_while_a_failback_runs(lab, operator):
    replica = replica_named("app-crm")
    session = start(operator, replica)
    vms_before = {vm.vm_id for vm in lab.inventory().vms}

    with pytest.raises(CommandError, match=rf"Reset refused: failbacks still running on the lab: #{session.pk} "):
        call_command("seed_lab", "--no-user", "--reset", stdout=open(os.devnull, "w"))

    assert {vm.vm_id for vm in lab.inventory().vms} == vms_before
    assert Replica.objects.get(pk=replica.pk).state == ReplicaState.READY_TO_SWITCH
    refused = rows(AuditAction.RESET_LAB)
    assert [(e.outcome, e.data["sessions"]) for e in refused] == [(Outcome.REFUSED, [session.pk])]


def test_it_offers_power_on_for_a_suspended_lab_replica_and_resumes_it(lab, admin_user):
    replica = replica_named("web-01")
    lab.suspend(replica.vm_id)
    client = logged_in(admin_user)
    assert (
        reverse("failback:lab_power", args=[replica.pk, "on"])
        in client.get(reverse("failback:replicas")).content.decode()
    )

    power(client, replica, "on")

    assert lab.power_state(replica.vm_id) == POWERED_ON
    assert rows(AuditAction.LAB_POWER_ON)[-1].data["before"] == "suspended"
