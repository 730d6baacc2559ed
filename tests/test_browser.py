"""End to end in a real browser: Debian's Chromium (Playwright) against Daphne and a real qcluster.

What a DR admin does and sees: start a failback from the Replicas page, watch phase 1 live over the
websocket, switch, commit or undo; what a Viewer may not do; the audit trail and its exports; the
page on a tablet and a phone. Assertions are on texts, database states and disk files, never on speed.
"""

import csv
import filecmp
import json
import os
import random
import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from failback import workflow
from failback.choices import AuditAction, Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_ON
from failback.hypervisors.lab import LabHypervisor
from failback.models import AuditEvent, FailbackSession, Replica

from .browser_support import browser, csrf_token, login, new_page, off_loop, page, portal, wait_in_page  # noqa: F401
from .conftest import wait_for
from .helpers import replica_named, start

pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.browser]

CRM = "app-crm-01_replica"  # no guest tools: the switch powers it off at once
LONG = 45_000  # ms: generous waits for worker steps on a busy 2-core machine (not a speed assertion)
PROGRESS = 'progress[aria-label="Disk scsi0:0 progress"]'


def session_of(pk):
    return FailbackSession.objects.select_related("replica").get(pk=pk)


def status(page):
    return page.locator("#session-status")


def wait_status(pk, *statuses, timeout=60):
    return wait_for(
        lambda: FailbackSession.objects.get(pk=pk).status in statuses,
        timeout=timeout,
        what=f"session {pk} to reach {statuses}",
    )


def start_from_the_replicas_page(page, replica, *, bandwidth=None):
    """Replicas page → Start failback → the form (checked for its defaults) → the session page; returns the session pk."""
    page.goto("/replicas/")
    row = page.locator(f"#replica-{replica.pk}")
    expect(row).to_contain_text(CRM)
    expect(row).to_contain_text("Failover")
    row.get_by_role("link", name="Start failback").click()
    page.wait_for_url(f"**/replicas/{replica.pk}/failback/")
    expect(page.locator("#id_vm_name")).to_have_value("app-crm-01")
    assert page.locator("#id_target_host").input_value() == "esx-prod-01"  # production, not the replica's DR host
    assert page.locator("#id_target_datastore").input_value().startswith("prod-ds-")
    networks = page.locator("select[id^='id_net_']")
    assert networks.count() == 2
    assert sorted(networks.nth(i).input_value() for i in range(2)) == [
        "prod-dmz",
        "prod-net",
    ]  # dr-* pre-mapped to prod-*
    assert page.locator("#id_switch_mode_0").get_attribute("value") == SwitchMode.AUTO
    assert page.locator("#id_switch_mode_1").get_attribute("value") == SwitchMode.SCHEDULED
    page.locator("#id_switch_mode_2").check()
    assert page.locator("#id_switch_mode_2").get_attribute("value") == SwitchMode.MANUAL
    if bandwidth:
        page.fill("#id_bandwidth_mbps", str(bandwidth))
    page.get_by_role("button", name="Review the failback").click()  # step 2: what will happen, and the checks
    expect(page.get_by_role("heading", name=f"Review the failback of {CRM}")).to_be_visible()
    page.get_by_role("button", name="Start failback").click()
    page.wait_for_url(re.compile(r"/sessions/\d+/$"))
    return int(re.search(r"/sessions/(\d+)/$", page.url).group(1))


def act(page, button, confirm):
    """Press the session page's button, then the confirmation in the dialog it opens; returns the dialog's text."""
    page.locator("#session-actions").get_by_role("button", name=button, exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("button", name=confirm)).to_be_visible()
    text = dialog.inner_text()
    dialog.get_by_role("button", name=confirm).click()
    expect(dialog).to_be_hidden()
    return text


def until_failback(page, pk):
    expect(status(page)).to_have_text("Ready to switch", timeout=LONG)
    act(page, "Switch now", "Shut down the replica and switch")
    expect(status(page)).to_have_text("Failback", timeout=LONG)


def run_failback(operator, replica, until=SessionStatus.COMMITTED, **options):
    """A failback driven through the workflow (the qcluster does the work) up to ``until``; returns the session pk."""
    pk = off_loop(start, operator, replica, **options).pk
    wait_status(pk, SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED)
    if until == SessionStatus.READY_TO_SWITCH:
        return pk
    off_loop(workflow.switch_now, operator, pk)
    wait_status(pk, SessionStatus.FAILBACK, SessionStatus.FAILED)
    if until == SessionStatus.FAILBACK:
        return pk
    off_loop(workflow.commit, operator, pk)
    wait_status(pk, SessionStatus.COMMITTED, SessionStatus.FAILED)
    return pk


def forge(page, portal, pk, action):
    """A POST the page offers no button for, as htmx would send it, with the user's own CSRF token."""
    return page.request.post(
        f"{portal.url}/sessions/{pk}/{action}/",
        form={"reason": "forged"},
        headers={"X-CSRFToken": csrf_token(page), "Referer": portal.url + "/", "HX-Request": "true"},
    )


def test_it_fails_back_through_the_browser_with_live_progress_and_commits(page, portal):
    replica = Replica.objects.get(name=CRM)
    lab = LabHypervisor(settings.LAB_ROOT)
    capacity = replica.disks.get(key="scsi0:0").capacity_bytes
    lab.guest_write(replica.vm_id, "scsi0:0", 0, random.Random(7).randbytes(min(capacity, 5 * 2**20)))  # ~5 s at 1 MB/s
    login(page, "olivia")
    pk = start_from_the_replicas_page(page, replica, bandwidth=1)
    expect(page.get_by_role("status").first).to_contain_text(f"Failback #{pk} of {CRM} started")
    assert "MB/s" in page.locator("dl.facts").inner_text()
    doc = page.evaluate("window.__doc")
    page.evaluate(
        """sel => { window.__seen = [];
        const tick = () => { const p = document.querySelector(sel), s = document.querySelector('#session-status');
            if (!p || !s) return; const v = Number(p.value), st = s.textContent.trim(), last = window.__seen.at(-1);
            if (!last || last[0] !== v || last[1] !== st) window.__seen.push([v, st]); };
        tick(); window.__rec = setInterval(tick, 20); }""",
        PROGRESS,
    )

    expect(status(page)).to_have_text("Ready to switch", timeout=LONG)
    seen = page.evaluate("clearInterval(window.__rec), window.__seen")
    # The engine counts a 4 MiB block as done once it is copied and hashed: this 2-block disk moves in
    # at most two steps (the growth through many steps is asserted on a larger disk below).
    phase1 = [v for v, st in seen if st == "Phase 1 running"]
    assert phase1 and min(phase1) < 100, f"phase 1 never seen running: {seen}"
    assert phase1 == sorted(phase1), f"progress went backwards: {seen}"
    assert seen[-1] == [100, "Ready to switch"], seen
    assert page.evaluate("window.__doc") == doc, "the page was reloaded"
    assert page.evaluate("window.__ws.messages") >= 2

    asked = [act(page, "Switch now", "Shut down the replica and switch")]
    expect(status(page)).to_have_text("Failback", timeout=LONG)
    expect(page.locator("#session-progress")).to_contain_text("switch window")
    asked.append(act(page, "Commit", "Commit the failback"))
    expect(status(page)).to_have_text("Committed", timeout=LONG)
    expect(page.get_by_role("button", name="Undo")).to_have_count(0)
    assert page.evaluate("window.__doc") == doc, "the page was reloaded"
    assert [text.split("?")[0] for text in asked] == [
        f"Switch {CRM} over to app-crm-01 now",
        "Commit the failback to app-crm-01",
    ]
    assert page.dialogs == []  # the dialogs are the page's own, no browser confirm()
    assert page.js_errors == []

    session = session_of(pk)
    assert session.status == SessionStatus.COMMITTED, session.error
    assert session.replica.state == ReplicaState.READY
    assert session.bandwidth_mbps == 1 and session.switch_mode == SwitchMode.MANUAL
    assert [
        (e.action, e.actor_name) for e in AuditEvent.objects.filter(session=session, action__in=["switch", "commit"])
    ] == [("switch", "olivia"), ("commit", "olivia")]
    disks = list(session.disks.all())
    assert disks
    for disk in disks:
        assert filecmp.cmp(
            lab.disk_path(replica.vm_id, disk.key), lab.disk_path(session.production_vm_id, disk.key), shallow=False
        )
        assert disk.verified


def test_it_shows_phase1_progress_and_time_left_growing_live(page, portal):
    """A 32 MiB replica (8 blocks) copied at 4 MB/s: the bar climbs through the blocks without a reload."""
    lab = LabHypervisor(settings.LAB_ROOT)
    vm_id = lab.create_vm(
        "big-01_replica",
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=[32 * 2**20],
        networks=["dr-net"],
        tools_installed=False,
        power_on=True,
    )
    lab.guest_write(vm_id, "scsi0:0", 0, random.Random(8).randbytes(32 * 2**20))
    call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))  # imports the new replica
    login(page, "olivia")
    page.goto("/sessions/")  # any page of the portal, so the recorder below starts at once on the session page
    pk = off_loop(start, portal.users["olivia"], replica_named("big-01"), bandwidth_mbps=4).pk
    page.goto(f"/sessions/{pk}/")
    doc = page.evaluate("window.__doc")
    page.evaluate(
        """sel => { window.__seen = [];
        const tick = () => { const p = document.querySelector(sel), s = document.querySelector('#session-status');
            if (!p || !s) return; const heads = [...p.closest('table').querySelectorAll('thead th')].map(th => th.textContent.trim());
            const left = p.closest('tr').children[heads.indexOf('Time left')].textContent.trim();
            const v = Number(p.value), st = s.textContent.trim(), last = window.__seen.at(-1);
            if (!last || last[0] !== v || last[1] !== st || last[2] !== left) window.__seen.push([v, st, left]); };
        tick(); window.__rec = setInterval(tick, 20); }""",
        PROGRESS,
    )
    expect(status(page)).to_have_text("Ready to switch", timeout=LONG)
    seen = page.evaluate("clearInterval(window.__rec), window.__seen")
    phase1 = [v for v, st, _ in seen if st == "Phase 1 running"]
    assert phase1 == sorted(phase1), f"progress went backwards: {seen}"
    assert len({v for v in phase1 if 0 < v < 100}) >= 3, f"too few steps between 0 and 100: {seen}"
    assert any(
        re.fullmatch(r"\d+ s", left) and v < 100 for v, st, left in seen if st == "Phase 1 running"
    ), f"no time left shown: {seen}"
    assert seen[-1][:2] == [100, "Ready to switch"]
    assert page.evaluate("window.__doc") == doc, "the page was reloaded"


def test_it_undoes_a_failback_from_the_browser(page, portal):
    replica = Replica.objects.get(name=CRM)
    lab = LabHypervisor(settings.LAB_ROOT)
    login(page, "olivia")
    pk = start_from_the_replicas_page(page, replica)
    until_failback(page, pk)
    assert lab.power_state(replica.vm_id) != POWERED_ON  # the replica stays off until commit or undo
    asked = act(page, "Undo", "Undo the failback")
    expect(status(page)).to_have_text("Undone", timeout=LONG)
    assert "discarded" in asked  # the confirmation says what is lost
    session = session_of(pk)
    assert session.status == SessionStatus.UNDONE, session.error
    assert session.replica.state == ReplicaState.FAILOVER
    assert lab.power_state(replica.vm_id) == POWERED_ON
    page.goto("/replicas/")
    expect(page.locator(f"#replica-{replica.pk}")).to_contain_text("Failover")
    expect(
        page.locator(f"#replica-{replica.pk}").get_by_role("link", name="Start failback")
    ).to_be_visible()  # a new attempt may start


def test_it_shows_a_viewer_no_buttons_and_refuses_a_forged_commit(page, portal):
    olivia = portal.users["olivia"]
    pk = run_failback(olivia, Replica.objects.get(name=CRM), until=SessionStatus.FAILBACK)
    login(page, "victor")
    page.goto(f"/sessions/{pk}/")
    expect(status(page)).to_have_text("Failback")
    wait_in_page(page, "window.__ws.messages >= 1")  # the live fragments (rendered for victor) arrived too
    for name in ("Switch now", "Commit", "Undo", "Schedule switch"):
        expect(page.get_by_role("button", name=name)).to_have_count(0)

    response = forge(page, portal, pk, "commit")
    assert response.status == 409
    assert "Operator role" in response.text()
    session = session_of(pk)
    assert (session.status, session.replica.state) == (SessionStatus.FAILBACK, ReplicaState.FAILBACK)
    refused = AuditEvent.objects.get(session_id=pk, action="commit")
    assert (refused.outcome, refused.actor_name) == (Outcome.REFUSED, "victor")


def test_it_keeps_anonymous_visitors_out_of_pages_and_websockets(page, portal):
    pk = off_loop(start, portal.users["olivia"], Replica.objects.get(name=CRM)).pk
    page.goto("/")
    assert page.url.startswith(f"{portal.url}/accounts/login/?next=/")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    probe = """url => new Promise(resolve => {
        const ws = new WebSocket(url); let opened = false;
        ws.onopen = () => { opened = true; ws.close(); };
        ws.onclose = e => resolve({opened, code: e.code});
        setTimeout(() => resolve({opened, timeout: true}), 15000); })"""
    ws_url = f"ws://127.0.0.1:{portal.port}/ws/sessions/{pk}/"
    anonymous = page.evaluate(probe, ws_url)
    assert anonymous["opened"] is False and not anonymous.get("timeout"), anonymous
    login(page, "victor")  # the same probe, logged in: it does connect (so the refusal above is the login's doing)
    assert page.evaluate(probe, ws_url)["opened"] is True


@pytest.mark.faults
def test_it_reconnects_live_updates_after_the_web_server_restarts(page, portal):
    olivia = portal.users["olivia"]
    pk = run_failback(olivia, Replica.objects.get(name=CRM), until=SessionStatus.READY_TO_SWITCH)
    login(page, "olivia")
    page.goto(f"/sessions/{pk}/")
    line = page.locator(".status-line")
    expect(line).to_contain_text("switch manually")
    wait_in_page(page, "window.__ws.open >= 1")
    doc = page.evaluate("window.__doc")
    switch_at = (timezone.now() + timedelta(hours=2)).replace(second=0, microsecond=0)

    def while_down():
        wait_in_page(page, "window.__ws.close >= 1", timeout=10_000)  # the page noticed
        off_loop(workflow.schedule_switch, olivia, pk, switch_at, reason="CHG-7 during the restart")

    portal.restart_web(between=while_down)
    expect(line).to_contain_text("at a scheduled time", timeout=30_000)
    expect(line).to_contain_text(timezone.localtime(switch_at).strftime("%Y-%m-%d %H:%M"))
    assert page.evaluate("window.__doc") == doc, "the page was reloaded"
    assert page.evaluate("window.__ws.open") >= 2, page.evaluate("window.__ws")


def test_it_switches_with_the_keyboard(page, portal):
    olivia = portal.users["olivia"]
    pk = run_failback(olivia, Replica.objects.get(name=CRM), until=SessionStatus.READY_TO_SWITCH)
    login(page, "olivia")
    page.goto(f"/sessions/{pk}/")
    expect(status(page)).to_have_text("Ready to switch")
    wait_in_page(page, "window.__ws.messages >= 1")
    for _ in range(60):
        page.keyboard.press("Tab")
        if (
            page.evaluate("document.activeElement.tagName === 'BUTTON' && document.activeElement.textContent.trim()")
            == "Switch now"
        ):
            break
    else:
        pytest.fail("Tab never reached the Switch now button")
    page.keyboard.press("Enter")  # the dialog opens on its reason field
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("heading")).to_have_text(f"Switch {CRM} over to {session_of(pk).vm_name} now?")
    expect(dialog.locator("[name=reason]")).to_be_focused()  # the dialog moved focus there (a loaded machine: later)
    page.keyboard.type("CHG-9")
    page.keyboard.press("Tab")  # to the dialog's confirmation
    expect(dialog.get_by_role("button", name="Shut down the replica and switch")).to_be_focused()
    page.keyboard.press("Enter")
    expect(status(page)).to_have_text("Failback", timeout=LONG)
    session = session_of(pk)
    assert (session.status, session.replica.state) == (SessionStatus.FAILBACK, ReplicaState.FAILBACK)
    assert AuditEvent.objects.get(session=session, action="switch", outcome=Outcome.OK).actor_name == "olivia"


LAYOUT_PROBLEMS = """() => {
  const problems = [], width = window.innerWidth;
  if (document.documentElement.scrollWidth > width + 1) {
    const wide = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > width + 1)
      .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + (e.className ? '.' + String(e.className).split(' ')[0] : ''));
    problems.push(`page ${document.documentElement.scrollWidth}px wide in a ${width}px window: ${wide.slice(0, 6).join(', ')}`);
  }
  const shown = e => e.getClientRects().length > 0;
  for (const b of document.querySelectorAll('button, input[type=submit], input[type=button], [role=button]')) {
    if (shown(b) && !(b.getAttribute('aria-label') || b.textContent || b.value || b.title || '').trim())
      problems.push('button without a name: ' + b.outerHTML.slice(0, 100));
  }
  for (const f of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
    const labelled = [...(f.labels || [])].some(l => l.textContent.trim()) || f.getAttribute('aria-label') || f.getAttribute('aria-labelledby') || f.title;
    if (shown(f) && !labelled) problems.push('field without a label: ' + f.outerHTML.slice(0, 100));
  }
  return problems;
}"""


@pytest.mark.parametrize("width,height", [(768, 1024), (390, 844)], ids=["tablet", "phone"])
def test_it_fits_narrow_screens_with_named_controls(browser, portal, width, height):
    olivia = portal.users["olivia"]
    replica = Replica.objects.get(name=CRM)
    pk = run_failback(olivia, replica, until=SessionStatus.READY_TO_SWITCH)
    narrow = new_page(browser, portal.url, width=width, height=height)
    try:
        login(narrow, "olivia")
        problems = {}
        for path in (
            "/replicas/",
            f"/replicas/{Replica.objects.get(name='app-erp-01_replica').pk}/failback/",
            f"/sessions/{pk}/",
        ):
            narrow.goto(path)
            narrow.wait_for_load_state("networkidle")
            problems[path] = narrow.evaluate(LAYOUT_PROBLEMS)
        assert problems == {path: [] for path in problems}
        # The controls an operator needs are found by their accessible names.
        expect(narrow.get_by_role("button", name="Switch now")).to_be_visible()
        expect(narrow.get_by_role("button", name="Schedule switch")).to_be_attached()
        narrow.get_by_role("button", name="Switch now").click()  # the dialog fits too, with its controls named
        expect(narrow.get_by_role("dialog").get_by_role("textbox", name="Why switch now")).to_be_visible()
        assert narrow.evaluate(LAYOUT_PROBLEMS) == []
        narrow.get_by_role("dialog").get_by_role("button", name="Go back").click()
        expect(narrow.get_by_role("navigation", name="Main").get_by_role("link", name="Replicas")).to_be_attached()
        narrow.goto("/replicas/")
        expect(narrow.get_by_role("searchbox", name="Search")).to_be_attached()
        expect(narrow.get_by_role("button", name="Apply")).to_be_attached()
    finally:
        narrow.context.close()


def test_it_lists_filters_and_exports_the_audit_trail(page, portal):
    olivia = portal.users["olivia"]
    pk = run_failback(olivia, Replica.objects.get(name=CRM))
    login(page, "victor")
    assert forge(page, portal, pk, "undo").status == 409  # a refused attempt, on the record

    page.goto("/audit/")
    table = page.locator("table.grid tbody")
    for action in ("start_failback", "finish_phase1", "switch", "finish_switch", "commit", "finish_commit", "undo"):
        expect(table).to_contain_text(AuditAction(action).label)  # shown by label, the stored name in its title
        expect(table.locator(f'td[title="{action}"]').first).to_be_visible()
    total = AuditEvent.objects.count()
    expect(page.locator("main")).to_contain_text(f"{total} events")

    page.select_option("#id_outcome", "refused")
    page.fill("#id_q", "Operator role")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"/audit/\?.*outcome=refused"))
    assert "q=Operator+role" in page.url
    rows = table.locator("tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("victor")
    expect(rows.first).to_contain_text("undo")
    expect(rows.first).to_contain_text("Refused")
    expect(page.locator("main")).to_contain_text("1 event ")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export CSV").click()
    download = download_info.value
    assert re.fullmatch(r"audit-\d{8}-\d{6}\.csv", download.suggested_filename)
    with open(download.path(), newline="", encoding="utf-8") as fh:
        exported = list(csv.reader(fh))
    assert exported[0][:3] == ["at", "actor", "action"]
    body = [dict(zip(exported[0], row, strict=False)) for row in exported[1:]]
    assert [(r["actor"], r["action"], r["outcome"], r["session"]) for r in body] == [
        ("victor", "undo", "refused", str(pk))
    ]

    href = page.get_by_role("link", name="Export JSON").get_attribute("href")
    assert "outcome=refused" in href
    items = json.loads(page.request.get(portal.url + href).text())
    assert isinstance(items, list) and [(i["actor"], i["action"], i["outcome"]) for i in items] == [
        ("victor", "undo", "refused")
    ]
    everything = json.loads(page.request.get(portal.url + "/audit/export.json").text())
    assert len(everything) == total


def test_it_prints_a_report_with_checksums_and_the_switch_window(page, portal):
    olivia = portal.users["olivia"]
    pk = run_failback(olivia, Replica.objects.get(name=CRM))
    session = session_of(pk)
    login(page, "victor")
    page.goto(f"/sessions/{pk}/")
    page.get_by_role("link", name="Printable report").click()
    page.wait_for_url(f"**/sessions/{pk}/report/")
    report = page.locator("article.report")
    expect(report).to_contain_text("Committed")
    digests = page.locator("td.digest").all_inner_texts()
    assert digests and all(d.startswith("xxh3-tree") for d in digests), digests
    for disk in session.disks.all():
        assert disk.source_digest == disk.target_digest and disk.source_digest in digests
    window = page.locator("dt", has_text="Switch window").locator("xpath=following-sibling::dd[1]").inner_text()
    assert re.search(r"\d", window) and "replica going down" in window, window
    assert session.switch_window is not None
    decided = page.locator("dt", has_text="Decided by").locator("xpath=following-sibling::dd[1]").inner_text()
    assert "Switch now: olivia" in decided and "Commit: olivia" in decided
