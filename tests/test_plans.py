"""Failback plans: order, concurrency, one switch moment, ordered power-on, all-or-nothing start."""

import filecmp
from datetime import timedelta

import pytest
from django.utils import timezone

from failback import plans, workflow
from failback.choices import Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_ON
from failback.models import AuditEvent, FailbackPlan, FailbackSession, Replica

from .helpers import network_map, replica_named

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

NAMES = ["app-crm", "web-01", "app-erp"]  # boot order


def members(lab, names=NAMES):
    out = []
    for name in names:
        replica = replica_named(name)
        lab.set_vm_options(replica.vm_id, shutdown_seconds=0.2, shutdown_hangs=False)
        out.append(
            {
                "replica_id": replica.pk,
                "vm_name": f"{replica.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(replica),
            }
        )
    return out


def sessions_of(plan):
    return list(FailbackSession.objects.filter(plan=plan).select_related("replica").order_by("plan_order"))


def test_it_runs_phase1_in_order_within_the_limit_and_switches_all_together(lab, operator):
    plan = plans.start_plan(
        operator, name="wave 1", members=members(lab), concurrency=1, switch_mode=SwitchMode.AUTO, power_on_delay_s=1
    )
    found = sessions_of(plan)
    assert [s.status for s in found] == [SessionStatus.FAILBACK] * 3
    # Concurrency 1: each phase 1 started after the previous one ended, in plan order.
    for before, after in zip(found, found[1:], strict=False):
        assert before.phase1_ended_at <= after.phase1_started_at
    # One switch moment for all; production VMs powered on in order, the delay between them.
    assert len({s.switch_started_at for s in found}) == 1
    for before, after in zip(found, found[1:], strict=False):
        assert (after.production_on_at - before.production_on_at).total_seconds() >= 1
    for s in found:
        assert lab.power_state(s.production_vm_id) == POWERED_ON
        for d in s.disks.all():
            assert filecmp.cmp(
                lab.disk_path(s.replica.vm_id, d.key), lab.disk_path(s.production_vm_id, d.key), shallow=False
            )
    assert AuditEvent.objects.filter(action="switch_plan", outcome=Outcome.OK).count() == 1


def test_it_waits_for_every_member_before_a_manual_switch_and_commits_the_plan(lab, operator):
    plan = plans.start_plan(operator, name="wave 2", members=members(lab, NAMES[:2]), concurrency=2)
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.READY_TO_SWITCH}
    with pytest.raises(workflow.Refused, match="belongs to plan wave 2"):
        workflow.switch_now(operator, sessions_of(plan)[0].pk)  # members switch with their plan
    assert plans.switch_now(operator, plan.pk, reason="window open")
    with pytest.raises(workflow.Refused, match="has already switched"):
        plans.switch_now(operator, plan.pk)
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.FAILBACK}
    assert plans.commit(operator, plan.pk, reason="all good") == [s.pk for s in sessions_of(plan)]
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.COMMITTED}
    assert {s.replica.state for s in sessions_of(plan)} == {ReplicaState.READY}


def test_it_undoes_a_single_member_of_a_plan(lab, operator):
    plan = plans.start_plan(operator, name="wave 3", members=members(lab, NAMES[:2]), switch_mode=SwitchMode.AUTO)
    first, second = sessions_of(plan)
    workflow.undo(operator, first.pk)
    assert [s.status for s in sessions_of(plan)] == [SessionStatus.UNDONE, SessionStatus.FAILBACK]
    assert Replica.objects.get(pk=first.replica_id).state == ReplicaState.FAILOVER


def test_it_starts_all_members_or_none(lab, operator):
    bad = members(lab, NAMES[:2])
    bad[1]["target_host"] = "esx-nowhere"
    with pytest.raises(workflow.Refused, match="Plan wave 4 not started: Unknown target host"):
        plans.start_plan(operator, name="wave 4", members=bad)
    assert [s.status for s in FailbackSession.objects.all()] == [SessionStatus.CANCELLED]
    assert Replica.objects.get(pk=bad[0]["replica_id"]).state == ReplicaState.FAILOVER
    assert workflow.start_failback(
        operator,
        bad[0]["replica_id"],
        vm_name="again",
        target_host="esx-prod-01",
        target_datastore="prod-ds-01",
        network_map=bad[0]["network_map"],
    )  # the replica is free again


def test_it_switches_the_plan_at_its_scheduled_time(lab, operator):
    when = timezone.now() + timedelta(hours=1)
    plan = plans.start_plan(
        operator, name="wave 5", members=members(lab, NAMES[:2]), switch_mode=SwitchMode.SCHEDULED, switch_at=when
    )
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.READY_TO_SWITCH}
    FailbackPlan.objects.filter(pk=plan.pk).update(switch_at=timezone.now() - timedelta(seconds=5))
    plans.scheduled_switch_due(plan.pk)
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.FAILBACK}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"name": ""}, "Name the plan"),
        ({"members": []}, "at least one replica"),
        ({"concurrency": 0}, "between 1 and 20"),
        ({"power_on_delay_s": 99999}, "between 0 and 3600"),
        ({"switch_mode": "scheduled"}, "needs a date and time"),
    ],
)
def test_it_refuses_a_bad_plan(lab, operator, kwargs, message):
    options = {"name": "w", "members": members(lab, NAMES[:1])}
    options.update(kwargs)
    with pytest.raises(workflow.Refused, match=message):
        plans.start_plan(operator, **options)
    assert not FailbackSession.objects.exists()


def test_it_refuses_a_viewer_plan(lab, viewer):
    with pytest.raises(workflow.Refused, match="Operator role"):
        plans.start_plan(viewer, name="nope", members=members(lab, NAMES[:1]))


def test_it_starts_a_plan_from_the_selected_replicas(lab, operator, viewer):
    from django.test import Client
    from django.urls import reverse

    client = Client()
    client.force_login(operator)
    listing = client.get(reverse("failback:replicas")).content.decode()
    assert "Fail back selected as a plan" in listing and 'aria-label="Select app-crm-01_replica"' in listing
    picked = [replica_named(n) for n in NAMES[:2]]
    form = client.get(reverse("failback:plan_new"), {"replica": [r.pk for r in picked]}).content.decode()
    assert "Fail back 2 replicas as a plan" in form and "dr-net → prod-net" in form
    post = {
        "replica": [r.pk for r in picked],
        "name": "from the ui",
        "concurrency": 1,
        "switch_mode": "manual",
        "power_on_after": "on",
        "power_on_delay_s": 0,
        "reason": "",
    }
    for i, r in enumerate(reversed(picked), 1):  # boot order reversed on purpose
        post.update(
            {
                f"m{r.pk}_order": i,
                f"m{r.pk}_vm_name": f"{r.source_name}-p",
                f"m{r.pk}_host": "esx-prod-01",
                f"m{r.pk}_datastore": "prod-ds-01",
            }
        )
    response = client.post(reverse("failback:plan_new"), post)
    plan = FailbackPlan.objects.get(name="from the ui")
    assert response.status_code == 302 and response.url == reverse("failback:plan", args=[plan.pk])
    assert [s.replica_id for s in sessions_of(plan)] == [picked[1].pk, picked[0].pk]
    page = client.get(reverse("failback:plan", args=[plan.pk])).content.decode()
    assert "Plan progress" in page and ">Switch now</button>" in page
    viewer_client = Client()
    viewer_client.force_login(viewer)
    viewer_client.post(reverse("failback:plan_action", args=[plan.pk, "switch"]))
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.READY_TO_SWITCH}  # refused
    assert AuditEvent.objects.filter(action="switch_plan", outcome=Outcome.REFUSED, actor=viewer).exists()
