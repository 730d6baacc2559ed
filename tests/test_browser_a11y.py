"""Accessibility as a test: every page of the portal, checked in Chromium with axe-core, has no serious or
critical violation, in the states an admin sees it (a session queued, in phase 1, ready to switch with
its predicted downtime, in Failback with the measured one, ended; the wizard's review step; the action
dialogs open). Also on the session page: the note
"Failback #N started." goes once the live page shows the session ended.

The portal here is Daphne alone, without a worker: the sessions are put in each state by the test, so
nothing moves while axe reads the page (live updates still arrive over the websocket).
"""

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from failback import plans, workflow
from failback.choices import SessionStatus
from failback.models import FailbackSession, SessionDisk, VCenterConnection

from .browser_support import (  # noqa: F401 (fixtures)
    Portal,
    axe_violations,
    browser,
    login,
    new_page,
    off_loop,
    server_env,
    wait_in_page,
)
from .conftest import make_user
from .helpers import network_map, put_session_in, replica_named, start

pytest.importorskip("axe_playwright_python", reason="pip install -e '.[dev]' (axe-playwright-python)")
from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.browser]
MiB = 1 << 20


@pytest.fixture
def web(lab, settings, tmp_path, monkeypatch):
    """Daphne on the test database, no qcluster: queued work stays queued."""
    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "SYNC", False)
    ada = make_user("ada", "Administrator")
    ada.groups.add(*make_user("olivia", "Operator").groups.all())
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    server = Portal(env=server_env(settings), log_dir=log_dir, users={"ada": ada})
    try:
        server.start_web()
        yield server
    finally:
        server.stop()


def stamp(session, **fields):
    FailbackSession.objects.filter(pk=session.pk).update(**fields)
    return FailbackSession.objects.get(pk=session.pk)


def sessions_in_every_state(ada):
    """One session per state the session page looks different in; returns {name: pk}."""
    now = timezone.now()
    ago = lambda s: now - timedelta(seconds=s)  # noqa: E731
    queued = start(ada, replica_named("web-01"))
    phase1 = put_session_in(start(ada, replica_named("db-sql")), SessionStatus.PHASE1)
    stamp(phase1, phase1_started_at=ago(40), throughput=[[time.time() - 40 + i, (20 + i) * MiB, 1] for i in range(20)])
    SessionDisk.objects.filter(session=phase1).update(
        bytes_total=512 * MiB, bytes_done=200 * MiB, bytes_written=200 * MiB, rate_bps=30 * MiB, eta_s=12
    )
    ready = put_session_in(start(ada, replica_named("app-erp"), bandwidth_mbps=5), SessionStatus.READY_TO_SWITCH)
    stamp(
        ready,
        phase1_started_at=ago(300),
        phase1_ended_at=ago(200),
        prediction={
            "now": {
                "at": now.isoformat(),
                "window_s": 14.5,
                "shutdown_s": 9.0,
                "shutdown_basis": "measured on this VM's last switch",
                "data_s": 4.5,
                "data_basis": "rates measured in this failback's phase 1",
                "delta_s": 3.0,
                "verify_s": 1.2,
                "overhead_s": 0.3,
                "changed_bytes": 48 * MiB,
                "power_on_s": 1.0,
                "power_on_basis": "the lab's power-on",
                "disks": [],
            },
            "checks": [],
        },
        # phase 1 ran, then nothing moved while the session waited to switch: the chart shows the gap idle
        throughput=[[time.time() - 300 + i, 40 * MiB, 1] for i in range(0, 100, 2)],
    )
    failback = put_session_in(start(ada, replica_named("app-crm")), SessionStatus.FAILBACK)
    stamp(
        failback,
        phase1_started_at=ago(600),
        phase1_ended_at=ago(500),
        switch_started_at=ago(60),
        replica_stop_started_at=ago(60),
        replica_off_at=ago(52),
        phase2_ended_at=ago(47),
        production_on_at=ago(45),
        prediction={"measured": {"shutdown_s": 8.0, "delta_s": 3.1, "verify_s": 1.4, "power_on_s": 2.0}},
    )
    workflow.cancel(ada, queued.pk, reason="wrong host")  # queued: cancelled at once
    return {"queued→cancelled": queued.pk, "phase1": phase1.pk, "ready": ready.pk, "failback": failback.pk}


def a_plan(ada):
    replica = replica_named("web-01")  # free again: its queued failback was cancelled
    return plans.start_plan(
        ada,
        name="wave-1",
        members=[
            {
                "replica_id": replica.pk,
                "vm_name": "web-prod-a11y",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(replica),
            }
        ],
    )


def test_every_page_has_no_serious_accessibility_violation(browser, web):  # noqa: F811 (fixtures)
    ada = web.users["ada"]
    found = {}
    anonymous = new_page(browser, web.url)
    try:
        anonymous.goto("/accounts/login/")
        found["login"] = axe_violations(anonymous)
    finally:
        anonymous.context.close()
    page = login(new_page(browser, web.url), ada)
    try:
        check(page, found, "wizard", f"/replicas/{replica_named('web-01').pk}/failback/")  # while all are in Failover
        page.get_by_role("button", name="Review the failback").click()
        expect(page.get_by_role("button", name="Start failback")).to_be_visible()
        found["wizard, review step"] = axe_violations(page)
        sessions = off_loop(sessions_in_every_state, ada)  # the workflow's live nudges need a thread without a loop
        plan = off_loop(a_plan, ada)
        connection = VCenterConnection.objects.create(name="vc-lab", host="vcenter.example.test", username="reader")
        pages = {
            "dashboard": "/",
            "replicas": "/replicas/",
            "sessions": "/sessions/",
            **{f"session ({name})": f"/sessions/{pk}/" for name, pk in sessions.items()},
            "report": f"/sessions/{sessions['failback']}/report/",
            "plans": "/plans/",
            "new plan": "/plans/new/",
            "plan": f"/plans/{plan.pk}/",
            "audit": "/audit/?q=wrong",
            "connections": "/connections/",
            "connection": f"/connections/{connection.pk}/",
            "new connection": "/connections/new/",
            "tokens": "/account/tokens/",
        }
        for name, url in pages.items():
            check(page, found, name, url)
        for name, button in (("ready", "Switch now"), ("failback", "Undo")):  # the action dialogs, open
            page.goto(f"/sessions/{sessions[name]}/")
            page.get_by_role("button", name=button).first.click()
            expect(page.locator("dialog[open]")).to_be_visible()
            found[f"session ({name}), {button} dialog"] = axe_violations(page)
        assert not page.js_errors, page.js_errors
    finally:
        page.context.close()
    assert {name: v for name, v in found.items() if v} == {}


def check(page, found, name, url):
    response = page.goto(url)
    assert response.status == 200, (name, url, response.status)
    found[name] = axe_violations(page)


def test_the_started_note_goes_when_the_live_page_shows_the_session_ended(browser, web):  # noqa: F811
    ada = web.users["ada"]
    replica = replica_named("web-01")
    page = login(new_page(browser, web.url), ada)
    try:
        page.goto(f"/replicas/{replica.pk}/failback/")
        form = page.locator("form:has(#id_vm_name)")
        fields = form.evaluate("f => Object.fromEntries(new FormData(f))")
        fields.pop("step", None)  # straight to the start, past the review
        response = page.request.post(
            f"/replicas/{replica.pk}/failback/", form=fields, headers={"Referer": web.url + "/"}, max_redirects=0
        )
        session = FailbackSession.objects.get(replica=replica)
        assert response.status == 302 and response.headers["location"].endswith(f"/sessions/{session.pk}/")
        page.goto(f"/sessions/{session.pk}/")
        note = page.locator("main > .messages .msg", has_text=f"Failback #{session.pk} of {replica.name} started.")
        expect(note).to_be_visible()
        wait_in_page(page, "window.__ws.open > 0")
        off_loop(workflow.cancel, ada, session.pk, reason="rehearsal over")  # queued: it ends at once
        expect(page.locator("#session-status")).to_have_text("Cancelled", timeout=15_000)
        expect(note).to_have_count(0)
    finally:
        page.context.close()
