"""One guard decides what may be done now: the session page, the API's allowed_actions and the service agree.

Before, each kept its own copy of the rules and they disagreed: a plan member's page offered Switch now
and Schedule switch, the API offered cancel for plan members, and POST /api/v1/plans skipped the
one-platform rule. The first test goes through every status, with and without a plan, with and without a
commit-policy countdown (the whole space: 64 cases), and holds the three views of the rule to each other.
"""

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from failback import actions, plans, workflow
from failback.choices import GUARDS, CommitPolicy, Outcome, SessionStatus
from failback.models import AuditEvent, FailbackSession, Replica, VCenterConnection

from .helpers import network_map, replica_named, start
from .test_api import Api, token_for

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def _service_call(name, actor, pk):
    data = {
        "reason": "",
        "override_checks": False,
        "keep_production_vm": False,
        "switch_at": timezone.now() + timedelta(hours=1),
        "windows": [],
        "downtime_budget_s": 120,
    }
    return actions.perform(name, actor, pk, data)


def _offered_on_page(client, session):
    html = client.get(f"/sessions/{session.pk}/").content.decode()
    return sorted(set(re.findall(rf'action="/sessions/{session.pk}/([a-z_]+)/"', html)))


def _set(session, status, countdown):
    due = timezone.now() + timedelta(minutes=30) if countdown else None
    FailbackSession.objects.filter(pk=session.pk).update(
        status=status,
        policy_due_at=due,
        policy_stopped_at=None,
        commit_policy=CommitPolicy.AUTO_COMMIT if countdown else CommitPolicy.NONE,
        commit_after_min=30 if countdown else None,
    )
    return FailbackSession.objects.select_related("replica", "plan").get(pk=session.pk)


def test_the_page_the_api_and_the_service_ask_the_same_guard_in_every_status(lab, operator):
    alone = start(operator, replica_named("app-crm"))
    plan = plans.start_plan(
        operator,
        name="wave",
        members=[
            {
                "replica_id": (r := replica_named("web-01")).pk,
                "vm_name": f"{r.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(r),
            }
        ],
    )
    member = plan.sessions.get()
    page, api = Client(), Api(token_for(operator))
    page.force_login(operator)
    for session in (alone, member):
        for status in SessionStatus:
            for countdown in (False, True):
                s = _set(session, status, countdown)
                allowed = sorted(actions.allowed(s))
                case = f"{status} plan={bool(s.plan_id)} countdown={countdown}"
                assert _offered_on_page(page, s) == allowed, case
                assert sorted(api.get(f"/sessions/{s.pk}").json()["allowed_actions"]) == allowed, case
                if s.plan_id:  # the plan switches, schedules and cancels its members together
                    assert not {"switch", "schedule", "cancel"} & set(allowed), case
                for name in sorted(set(actions.ACTIONS) - set(allowed)):
                    refused_before = AuditEvent.objects.filter(outcome=Outcome.REFUSED).count()
                    with pytest.raises(workflow.Refused):
                        _service_call(name, operator, s.pk)
                    after = FailbackSession.objects.get(pk=s.pk)
                    assert after.status == status, (case, name)
                    assert AuditEvent.objects.filter(outcome=Outcome.REFUSED).count() == refused_before + 1, (
                        case,
                        name,
                    )
    assert set(actions.BY_GUARD) == set(GUARDS)  # every guard has its action, every action its guard


def test_a_plan_of_two_platforms_is_refused_through_the_api_too(lab, operator):
    vcenter = VCenterConnection.objects.create(name="vc-2", host="127.0.0.1", username="u")
    lab_replica = replica_named("app-crm")
    other = Replica.objects.filter(pk=replica_named("web-01").pk)
    other.update(platform="vsphere", connection=vcenter)
    body = {
        "name": "mixed",
        "members": [
            {
                "replica_id": r.pk,
                "vm_name": f"{r.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": {},
            }
            for r in (lab_replica, other.get())
        ],
    }
    response = Api(token_for(operator)).post("/plans", body)
    assert response.status_code == 409, response.content
    assert "one platform" in response.json()["detail"]
    row = AuditEvent.objects.filter(action="start_plan").latest("id")
    assert row.outcome == Outcome.REFUSED and "one platform" in row.detail
    assert not FailbackSession.objects.exists()
