"""A failback plan of three replicas, started and finished in a real browser."""

import pytest
from django.conf import settings

from failback.choices import ReplicaState, SessionStatus
from failback.hypervisors.lab import LabHypervisor
from failback.models import AuditEvent, FailbackPlan, FailbackSession, Replica

from .browser_support import browser, login, page, portal  # noqa: F401

pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.browser]

LONG = 60_000  # ms: generous waits for worker steps on a busy machine (not a speed assertion)


def test_it_fails_back_a_plan_of_three_replicas_in_boot_order_and_commits_it(page, portal):  # noqa: F811 (fixtures)
    lab = LabHypervisor(settings.LAB_ROOT)
    names = ["app-crm-01_replica", "web-01_replica", "app-erp-01_replica"]
    replicas = [Replica.objects.get(name=n) for n in names]
    for r in replicas:
        lab.set_vm_options(r.vm_id, shutdown_seconds=0.2, shutdown_hangs=False)
    login(page, "olivia")
    page.goto("/replicas/")
    for r in replicas:
        page.get_by_label(f"Select {r.name}").check()
    page.get_by_role("button", name="Fail back selected as a plan").click()
    expect(page.get_by_role("heading", name="Fail back 3 replicas as a plan")).to_be_visible()
    page.get_by_label("Plan name").fill("wave A")
    page.get_by_label("Phase 1 copies at once").fill("1")
    page.get_by_label("Seconds between power-ons").fill("1")
    for order, r in enumerate(replicas, 1):
        page.get_by_label(f"Boot order of {r.name}").fill(str(order))
        page.get_by_label(f"Production VM name for {r.name}").fill(f"{r.source_name}-prod")
        page.get_by_label(f"Target host for {r.name}").select_option("esx-prod-01")
        page.get_by_label(f"Datastore for {r.name}").select_option("prod-ds-01")
    fetches = []  # htmx requests made by the page (it polled every 2 s before the websocket)
    page.on(
        "request", lambda request: fetches.append(request.url) if request.resource_type in ("xhr", "fetch") else None
    )
    page.get_by_role("button", name="Start plan").click()
    expect(page.get_by_role("heading", name="Plan wave A")).to_be_visible()
    doc = page.evaluate("window.__doc")
    members = page.locator("#plan-members")
    expect(members).to_contain_text(
        "3 Ready to switch", timeout=LONG
    )  # the page follows its members over its websocket
    assert page.evaluate("window.__doc") == doc, "the page was reloaded"
    assert page.evaluate("window.__ws.open") >= 1 and page.evaluate("window.__ws.messages") >= 1, page.evaluate(
        "window.__ws"
    )
    assert fetches == []
    page.get_by_role("button", name="Switch now").click()
    expect(members).to_contain_text("3 Failback", timeout=LONG)
    page.get_by_role("button", name="Commit").click()
    expect(members).to_contain_text("3 Committed", timeout=LONG)

    plan = FailbackPlan.objects.get(name="wave A")
    sessions = list(FailbackSession.objects.filter(plan=plan).order_by("plan_order"))
    assert [s.replica.name for s in sessions] == names
    assert all(s.status == SessionStatus.COMMITTED and s.replica.state == ReplicaState.READY for s in sessions)
    for before, after in zip(sessions, sessions[1:], strict=False):
        assert before.phase1_ended_at <= after.phase1_started_at  # one at a time, in order
        assert (after.production_on_at - before.production_on_at).total_seconds() >= 1  # powered on in order, 1 s apart


@pytest.mark.beyond
def test_the_plan_page_shows_the_switch_waiting_for_a_members_guest(page, portal):  # noqa: F811 (fixtures)
    from failback import plans
    from failback.choices import GuestGate

    from .helpers import network_map

    lab = LabHypervisor(settings.LAB_ROOT)
    first, second = Replica.objects.get(name="app-crm-01_replica"), Replica.objects.get(name="web-01_replica")
    lab.set_vm_options(first.vm_id, tools_installed=True, boot_seconds=8, shutdown_seconds=0.2, shutdown_hangs=False)
    lab.set_vm_options(second.vm_id, shutdown_seconds=0.2, shutdown_hangs=False)
    plan = plans.start_plan(
        portal.users["olivia"],
        name="gated wave",
        members=[
            {
                "replica_id": r.pk,
                "vm_name": f"{r.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(r),
            }
            for r in (first, second)
        ],
        guest_gate=GuestGate.GUEST,
        guest_gate_timeout_s=120,
    )
    login(page, "olivia")
    page.goto(f"/plans/{plan.pk}/")
    members = page.locator("#plan-members")
    expect(members).to_contain_text("2 Ready to switch", timeout=LONG)
    expect(page.locator("dl.facts")).to_contain_text("at most 120 s, else the rest of the plan stops")
    page.get_by_role("button", name="Switch now").click()
    # The first member is up on production; its guest boots for 8 s, and the second waits for it.
    gate = page.locator("#guest-gate")
    expect(gate).to_contain_text(
        f"Waiting for {first.source_name}-prod's guest before {second.source_name}-prod switches: guest ready",
        timeout=LONG,
    )
    expect(gate).to_contain_text("at most 120 s")
    expect(members).to_contain_text("2 Failback", timeout=LONG)
    expect(gate).to_have_count(0)
    (row,) = AuditEvent.objects.filter(action="guest_gate", session__plan=plan)
    assert row.outcome == "ok" and row.data["waited_s"] >= 8  # the lab guest's boot time
