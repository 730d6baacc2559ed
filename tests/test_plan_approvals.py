"""Four eyes on a plan's own Switch now and Schedule switch (issue 17, part 2): a rule on the plan (or on
every failback) makes them wait as a request; the requester cannot approve it; another Operator does,
and the plan's action then runs as the requester's with both names in the plan's audit row."""

from datetime import timedelta

import pytest
from django.utils import timezone

from failback import approvals, plans
from failback.choices import Outcome, SessionStatus, SwitchMode
from failback.models import ApprovalRequest, AuditEvent, FailbackPlan
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
