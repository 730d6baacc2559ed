"""A plan's hooks and its guest-ready gate chosen where a plan is started: the plan form (hooks ticked
from the allow-list for every member) and the API (issue 17, parts 3)."""

import socket

import pytest
from django.test import Client
from django.urls import reverse

from failback import plans
from failback.choices import AuditAction, Outcome, SessionStatus
from failback.models import AuditEvent, FailbackPlan, FailbackSession

from .helpers import replica_named
from .test_api import Api, token_for
from .test_hooks import allow_list  # noqa: F401 (fixture)
from .test_plans import NAMES, members, sessions_of

pytestmark = [pytest.mark.beyond, pytest.mark.django_db(databases="__all__", transaction=True)]


def hook_points(session):
    rows = AuditEvent.objects.filter(session_id=session.pk, action=AuditAction.RUN_HOOK, outcome=Outcome.OK)
    return sorted((r.data["point"], r.data["hook"]) for r in rows)


def test_the_plan_form_gives_every_member_the_ticked_hooks_and_the_gate(lab, operator, allow_list):  # noqa: F811
    client = Client()
    client.force_login(operator)
    picked = [replica_named(n) for n in NAMES[:2]]
    form = client.get(reverse("failback:plan_new"), {"replica": [r.pk for r in picked]}).content.decode()
    assert "Hooks for every member: after the switch (production powered on)" in form
    assert 'name="guest_gate" value="tcp"' in form
    for r in picked:
        lab.set_vm_options(r.vm_id, shutdown_seconds=0.2, shutdown_hangs=False)
    with socket.create_server(("127.0.0.1", 0)) as listening:
        post = {
            "replica": [r.pk for r in picked],
            "name": "hooked",
            "concurrency": 2,
            "switch_mode": "manual",
            "power_on_after": "on",
            "power_on_delay_s": 0,
            "guest_gate": "tcp",
            "guest_gate_address": f"127.0.0.1:{listening.getsockname()[1]}",
            "guest_gate_timeout_s": 30,
            "hooks_after_switch": ["record"],
            "reason": "",
        }
        for i, r in enumerate(picked, 1):
            post.update(
                {
                    f"m{r.pk}_order": i,
                    f"m{r.pk}_vm_name": f"{r.source_name}-p",
                    f"m{r.pk}_host": "esx-prod-01",
                    f"m{r.pk}_datastore": "prod-ds-01",
                }
            )
        response = client.post(reverse("failback:plan_new"), post)
        assert response.status_code == 302, response.content.decode()[:2000]
        plan = FailbackPlan.objects.get(name="hooked")
        assert plan.hooks == {"after_switch": ["record"]} and plan.guest_gate == "tcp"
        plans.switch_now(operator, plan.pk, reason="window")
    first, second = sessions_of(plan)
    assert [first.status, second.status] == [SessionStatus.FAILBACK] * 2
    for s in (first, second):  # the plan's hooks replace the replicas' defaults (erp-default is not run)
        assert s.hooks == {"after_switch": ["record"]}
        assert hook_points(s) == [("after_switch", "record")]
        assert (allow_list / f"{s.pk}-after_switch.env").exists()
    assert AuditEvent.objects.get(session_id=first.pk, action="guest_gate").outcome == Outcome.OK


def test_the_api_starts_a_plan_with_hooks_and_a_gate_and_refuses_an_unknown_hook(lab, operator, allow_list):  # noqa: F811
    api = Api(token_for(operator))
    body = {
        "name": "api hooked",
        "members": members(lab, NAMES[:1]),
        "guest_gate": "guest",
        "guest_gate_timeout_s": 120,
        "hooks": {"before_phase1": ["record"]},
    }
    refused = api.post("/plans", {**body, "hooks": {"before_phase1": ["rm-rf"]}})
    assert refused.status_code == 409 and "not in the allow-list" in refused.json()["detail"]
    created = api.post("/plans", body)
    assert created.status_code == 201, created.content
    out = created.json()
    assert out["guest_gate"] == "guest" and out["guest_gate_timeout_s"] == 120
    assert out["hooks"] == {"before_phase1": ["record"]}
    (member,) = sessions_of(FailbackPlan.objects.get(pk=out["id"]))
    assert hook_points(member) == [("before_phase1", "record")]


def test_the_start_wizard_offers_the_allow_lists_hooks_reviews_them_and_starts_with_them(lab, operator, allow_list):  # noqa: F811
    from .test_views import logged_in, start_form

    replica = replica_named("app-erp")  # its default from the file: erp-default before the switch
    client = logged_in(operator)
    url = reverse("failback:start", args=[replica.pk])
    page = client.get(url).content.decode()
    assert "Hooks: before the switch (the replica still runs)" in page and 'value="record"' in page
    defaults = client.post(url, start_form(replica, step="review")).content.decode()
    assert "before the switch (the replica still runs): erp-default (the allow-list&#x27;s defaults" in defaults
    chosen = {"hooks_after_switch": ["record", "chatty"]}
    review = client.post(url, start_form(replica, step="review", **chosen)).content.decode()
    assert "after the switch (production powered on): record, chatty" in review and "erp-default" not in review
    assert 'type="hidden" name="hooks_after_switch" value="chatty"' in review  # kept for the start
    response = client.post(url, start_form(replica, step="start", **chosen))
    assert response.status_code == 302
    session = FailbackSession.objects.get()
    assert session.hooks == {"after_switch": ["record", "chatty"]}
