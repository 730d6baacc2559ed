"""Four eyes on a plan's own Switch now and Schedule switch (issue 17, part 2): a rule on the plan (or on
every failback) makes them wait as a request; the requester cannot approve it; another Operator does,
and the plan's action then runs as the requester's with both names in the plan's audit row."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from failback import approvals, plans
from failback.choices import Outcome, SessionStatus, SwitchMode
from failback.models import ApprovalRequest, AuditEvent, FailbackPlan
from failback.notifications import config
from failback.notifications.models import Notification, NotificationEndpoint
from failback.workflow import Refused

from .conftest import make_user
from .test_api import Api, token_for
from .test_plans import NAMES, members, sessions_of

pytestmark = [pytest.mark.beyond, pytest.mark.django_db(databases="__all__", transaction=True)]


@pytest.fixture
def second(db):
    return make_user("sam", "Operator")


def ready_plan(lab, operator, name):
    plan = plans.start_plan(operator, name=name, members=members(lab, NAMES[:2]))
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.READY_TO_SWITCH}
    return plan


def test_a_plans_switch_now_waits_for_a_second_operator_and_runs_with_both_names(lab, operator, second, admin_user):
    plan = ready_plan(lab, operator, "four eyes")
    approvals.set_rule(admin_user, "switch", plan=plan)
    with pytest.raises(approvals.ApprovalRequested, match="Switch now on plan four eyes needs a second person"):
        plans.switch_now(operator, plan.pk, reason="CHG-42")
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.READY_TO_SWITCH}  # nothing done yet
    assert FailbackPlan.objects.get(pk=plan.pk).switch_started_at is None
    request = ApprovalRequest.objects.get(status=ApprovalRequest.Status.PENDING)
    assert request.params["plan_id"] == plan.pk and request.action == "switch"
    with pytest.raises(Refused, match="a second person must approve it"):
        approvals.approve(operator, request.pk)
    assert approvals.approve(second, request.pk, reason="ok").status == ApprovalRequest.Status.DONE
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.FAILBACK}
    row = AuditEvent.objects.get(action="switch_plan", outcome=Outcome.OK)
    assert row.actor_name == operator.username and row.data["approved_by"] == second.username
    assert "CHG-42" in row.detail


def test_a_plans_schedule_switch_needs_approval_under_a_global_rule_and_the_api_answers_202(
    lab, operator, second, admin_user
):
    plan = ready_plan(lab, operator, "scheduled four eyes")
    approvals.set_rule(admin_user, "schedule_switch")  # every failback, plans included
    when = (timezone.now() + timedelta(hours=2)).replace(microsecond=0)
    asked = Api(token_for(operator)).post(f"/plans/{plan.pk}/schedule", {"switch_at": when.isoformat(), "reason": ""})
    assert asked.status_code == 202, asked.content
    assert FailbackPlan.objects.get(pk=plan.pk).switch_mode == SwitchMode.MANUAL  # not scheduled yet
    approved = Api(token_for(second)).post(f"/approvals/{asked.json()['id']}/approve", {"reason": "ok"})
    assert approved.status_code == 200 and approved.json()["status"] == "done", approved.content
    plan.refresh_from_db()
    assert plan.switch_mode == SwitchMode.SCHEDULED and plan.switch_at == when
    row = AuditEvent.objects.get(action="schedule_plan_switch", outcome=Outcome.OK)
    assert row.actor_name == operator.username and row.data["approved_by"] == second.username
    plans.drop_plan_schedule(plan.pk)


def test_a_plans_automatic_switch_waits_for_approval_says_so_and_runs_once_approved(lab, operator, second, admin_user):
    config.save_endpoint(
        admin_user,
        NotificationEndpoint(
            name="approvers", kind="email", addresses="leads@example.org", events=["approval_requested"]
        ),
    )
    approvals.set_rule(admin_user, "switch")  # every failback, plans included
    plan = plans.start_plan(
        operator, name="auto four eyes", members=members(lab, NAMES[:2]), switch_mode=SwitchMode.AUTO
    )
    first = sessions_of(plan)[0]
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.READY_TO_SWITCH}  # held, not switched
    (request,) = ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING)
    assert request.requested_by is None and request.session_id == first.pk and request.params["plan_id"] == plan.pk
    asked = AuditEvent.objects.get(action="request_approval")
    assert asked.detail.startswith(f"Automatic switch of plan {plan.name}: every member is Ready to switch: waiting")
    assert Notification.objects.filter(session=first, event="approval_requested").count() == 1
    plans.switch_if_due(plan.pk)  # the moment comes again (another member's phase 1 ending): not asked twice
    assert ApprovalRequest.objects.count() == 1

    # The page and the API say what waits, and where to approve it.
    client = Client()
    client.force_login(operator)
    page = client.get(f"/plans/{plan.pk}/").content.decode()
    assert "waiting for approval (request #" in page and "asked by the portal" in page
    shown = Api(token_for(operator)).get(f"/plans/{plan.pk}").json()["waiting_for_approval"]
    assert [(w["id"], w["requested_by"]) for w in shown] == [(request.pk, None)]
    member = Api(token_for(operator)).get(f"/sessions/{first.pk}").json()["waiting_for_approval"]
    assert member[0]["text"].startswith(f"Automatic switch of plan {plan.name}")

    assert approvals.approve(second, request.pk, reason="change board ok").status == ApprovalRequest.Status.DONE
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.FAILBACK}
    row = AuditEvent.objects.get(action="switch_plan", outcome=Outcome.OK)
    assert row.actor is None and row.data["approved_by"] == second.username and row.data["trigger"] == "auto"
    for s in sessions_of(plan):  # each member's switch names the approver too
        switched = AuditEvent.objects.get(session=s, action="switch", outcome=Outcome.OK)
        assert switched.data["approved_by"] == second.username
    assert "waiting for approval" not in client.get(f"/plans/{plan.pk}/").content.decode()


def test_a_plans_scheduled_switch_waits_for_approval_under_the_plans_rule(lab, operator, second, admin_user):
    plan = ready_plan(lab, operator, "scheduled wait")
    approvals.set_rule(admin_user, "switch", plan=plan)
    when = (timezone.now() + timedelta(hours=1)).replace(microsecond=0)
    plans.schedule_switch(operator, plan.pk, when)  # Schedule switch itself needs no approval here
    FailbackPlan.objects.filter(pk=plan.pk).update(switch_at=timezone.now() - timedelta(seconds=1))
    plans.scheduled_switch_due(plan.pk)  # its moment came: it waits
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.READY_TO_SWITCH}
    (request,) = ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING)
    assert (
        request.params["trigger"] == "scheduled"
        and "Scheduled switch of plan scheduled wait due" in (request.params["detail"])
    )
    approvals.approve(operator, request.pk)  # the portal asked: any Operator may approve, the plan's starter too
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.FAILBACK}
    row = AuditEvent.objects.get(action="switch_plan", outcome=Outcome.OK)
    assert row.data["trigger"] == "scheduled" and row.data["approved_by"] == operator.username
    assert "approved by olivia" in row.detail


def test_a_plans_commit_asks_once_for_the_plan_and_commits_every_member_once_approved(
    lab, operator, second, admin_user
):
    plan = ready_plan(lab, operator, "commit four eyes")
    plans.switch_now(operator, plan.pk)
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.FAILBACK}
    approvals.set_rule(admin_user, "commit", plan=plan)
    with pytest.raises(approvals.ApprovalRequested, match="Commit on plan commit four eyes needs a second person"):
        plans.commit(operator, plan.pk, reason="CHG-77 all checked")
    (request,) = ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING)  # one for the plan
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.FAILBACK}
    approvals.approve(second, request.pk)
    assert {s.status for s in sessions_of(plan)} == {SessionStatus.COMMITTED}
    for s in sessions_of(plan):  # each member's commit is the requester's, and names the approver
        row = AuditEvent.objects.get(session=s, action="commit", outcome=Outcome.OK)
        assert row.actor == operator and row.data["approved_by"] == second.username
    plan_row = AuditEvent.objects.get(action="commit_plan", outcome=Outcome.OK)
    assert plan_row.data["approved_by"] == second.username and plan_row.data["refused"] == []
