"""Screenshots of the portal with realistic data, for docs/screenshots/ (1280 px wide, full page).

Seeds the demo lab (12 replicas, scale 1) in a temporary DR_PORTAL_VAR, creates users, starts Daphne
and a qcluster, and drives failbacks into different states through the workflow (the worker does the
work): one committed, one waiting in Failback, one scheduled, one in phase 1 under a bandwidth limit
(photographed mid-way), plus a refused attempt for the audit trail. Then Debian's Chromium
(/usr/bin/chromium, through Playwright) saves the pages. Nothing of the real var/ is touched.

Usage: .venv/bin/python tests/screenshots.py [--out docs/screenshots] [--keep]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGES = [
    "dashboard",
    "replicas",
    "start-failback",
    "start-review",
    "session-phase1",
    "session-ready",
    "session-dialog",
    "session-windows",
    "session-failback",
    "sessions",
    "plan",
    "plan-gate",
    "audit",
    "report",
]


HOOKS = """
[hooks.drain-erp]
command = ["/bin/sh", "-c", "echo lb-01: pool erp set to drain; echo lb-01: 0 active connections left on $DRPORTAL_REPLICA"]
timeout_s = 30

[hooks.smoke-erp]
command = ["/bin/sh", "-c", "echo GET https://erp.corp.example/health on $DRPORTAL_PRODUCTION_VM: 200 OK"]
timeout_s = 30
on_error = "continue"
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary var directory (printed)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    var = tempfile.mkdtemp(prefix="dr-shots-")
    hooks_file = Path(var) / "hooks.toml"  # the allow-list the ERP failback's hooks come from
    hooks_file.write_text(HOOKS)
    os.environ.update(
        {
            "DR_PORTAL_VAR": var,
            "FAILBACK_HOOKS_FILE": str(hooks_file),
            "DJANGO_SETTINGS_MODULE": "dr_portal.settings",
            "LOG_LEVEL": "WARNING",
            "FAILBACK_SHUTDOWN_TIMEOUT": "30",
            "FAILBACK_PROGRESS_INTERVAL": "0.5",
            "TIME_ZONE": "Europe/Berlin",
        }
    )
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "LAB_ROOT",
        "FAILBACK_STATE_DIR",
        "CHANNELS_DB_PATH",
        "DJANGO_ALLOW_ASYNC_UNSAFE",
    ):
        os.environ.pop(name, None)  # the embedded profile, all of it under the temporary var
    import django

    django.setup()
    portal = None
    try:
        portal = run(out, var)
    finally:
        if portal is not None:
            portal.stop()
        if args.keep:
            print(f"kept {var}")
        else:
            shutil.rmtree(var, ignore_errors=True)


def wait_status(pk, *statuses, timeout=300):
    from failback.models import FailbackSession

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session = FailbackSession.objects.get(pk=pk)
        if session.status in statuses:
            return session
        time.sleep(0.3)
    raise SystemExit(f"session {pk} did not reach {statuses} in {timeout} s (it is {session.status}: {session.error})")


def run(out, var):
    import random

    from django.conf import settings
    from django.core.management import call_command
    from django.utils import timezone

    from failback import workflow
    from failback.choices import SessionStatus, SwitchMode
    from failback.hypervisors.lab import LabHypervisor
    from failback.models import FailbackSession
    from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, INIT_SCRIPT, Portal, wait_in_page
    from tests.conftest import make_user
    from tests.helpers import replica_named, start

    quiet = open(os.devnull, "w")
    call_command("migrate", "--noinput", verbosity=0)
    call_command("migrate", "--database", "channels", "--noinput", verbosity=0)
    call_command("seed_lab", "--count", "12", "--scale", "1", "--no-user", stdout=quiet)
    olivia, victor = make_user("olivia", "Operator"), make_user("victor", "Viewer")
    ada = make_user("ada", "Administrator")
    lab = LabHypervisor(settings.LAB_ROOT)

    env = dict(os.environ, DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost")
    log_dir = Path(var) / "logs"
    log_dir.mkdir()
    portal = Portal(env=env, log_dir=log_dir)
    portal.start_worker()
    portal.start_web()
    print(f"portal at {portal.url}, logs in {log_dir}")

    def users_keep_working(replica, mib=6):
        rng = random.Random(replica.pk)
        for disk in replica.disks.all():
            for _ in range(mib):
                lab.guest_write(
                    replica.vm_id, disk.key, rng.randrange(0, disk.capacity_bytes - 2**20), rng.randbytes(2**20)
                )

    # Committed: the whole way, with users writing while it was Ready to switch.
    erp = replica_named("app-erp-01")
    committed = start(
        olivia,
        erp,
        reason="CHG-4711 return ERP to production",
        hooks={"before_switch": ["drain-erp"], "after_switch": ["smoke-erp"]},
    ).pk
    wait_status(committed, SessionStatus.READY_TO_SWITCH)
    users_keep_working(erp)
    workflow.switch_now(olivia, committed, reason="CHG-4711 maintenance window")
    wait_status(committed, SessionStatus.FAILBACK)
    workflow.commit(olivia, committed, reason="App owners confirmed ERP works")
    wait_status(committed, SessionStatus.COMMITTED)
    print(f"#{committed} committed")

    # Waiting in Failback for commit or undo; and a Viewer's forged commit, refused and on the record.
    web = replica_named("web-01")
    waiting = start(
        olivia,
        web,
        target_host="esx-prod-02",
        target_datastore="prod-ds-02",
        reason="CHG-4712",
        commit_policy="auto_undo",
        commit_after_min=120,
    ).pk
    wait_status(waiting, SessionStatus.READY_TO_SWITCH)
    users_keep_working(web, mib=3)
    workflow.switch_now(olivia, waiting, reason="CHG-4712")
    wait_status(waiting, SessionStatus.FAILBACK)
    try:
        workflow.commit(victor, waiting)
    except workflow.Refused:
        pass
    print(f"#{waiting} in Failback")

    # Ready to switch, the switch scheduled for the night.
    switch_at = (timezone.localtime() + timedelta(hours=6)).replace(minute=0, second=0, microsecond=0)
    scheduled = start(
        olivia, replica_named("file-01"), switch_mode=SwitchMode.SCHEDULED, switch_at=switch_at, reason="CHG-4713"
    ).pk
    wait_status(scheduled, SessionStatus.READY_TO_SWITCH)
    users_keep_working(replica_named("file-01"), mib=4)
    from failback import jobs

    jobs.run_readiness(scheduled, catch_up=False)  # what the every-minute refresh shows beside the buttons
    print(f"#{scheduled} scheduled for {switch_at}")

    # Phase 1 under a bandwidth limit: about a minute for the lab's largest replica.
    running = start(
        olivia, replica_named("ad-dc-01"), bandwidth_mbps=8, reason="CHG-4714 domain controller, WAN limit"
    ).pk
    print(f"#{running} in phase 1 at 8 MB/s")

    # A plan of three replicas, one phase 1 at a time: the first ready, the next copying, the last queued.
    from failback import plans
    from tests.helpers import network_map

    wave = [replica_named(n) for n in ("db-pg-01", "app-bi-01", "mail-01")]
    plan = plans.start_plan(
        olivia,
        name="Wave 2: back office",
        concurrency=1,
        power_on_delay_s=30,
        reason="CHG-4720",
        members=[
            {
                "replica_id": r.pk,
                "vm_name": r.source_name,
                "target_host": "esx-prod-02",
                "target_datastore": "prod-ds-02",
                "network_map": network_map(r),
            }
            for r in wave
        ],
    )
    first = FailbackSession.objects.filter(plan=plan).order_by("plan_order").first().pk
    wait_status(first, SessionStatus.READY_TO_SWITCH)
    print(f"plan {plan.name} under way")

    # Ready to switch, waiting for a night window where the downtime fits: the guest takes its time to stop, and
    # it writes faster than the WAN limit lets the copy go (the convergence warning).
    from failback import windows

    crm = replica_named("app-crm-01")
    lab.set_vm_options(crm.vm_id, tools_installed=True, shutdown_seconds=150, shutdown_hangs=False)
    fitting = start(olivia, crm, shutdown_timeout_s=300, reason="CHG-4715 CRM back, nights only").pk
    wait_status(fitting, SessionStatus.READY_TO_SWITCH)
    nights = ["weekly sat,sun 02:00-04:00 Europe/Berlin", "daily 23:00-24:00 Europe/Berlin"]
    windows.set_session_rules(
        olivia, fitting, windows=[windows.parse_line(n) for n in nights], budget_s=60, reason="CHG-4715"
    )
    FailbackSession.objects.filter(pk=fitting).update(bandwidth_mbps=2, catchup_at=timezone.now())  # the WAN limit
    users_keep_working(crm, mib=24)
    jobs.run_readiness(fitting, catch_up=False)
    print(f"#{fitting} waits for a window where its downtime fits")

    def start_gated_plan():
        """A plan whose switch will wait at its guest-ready gate: the database's guest takes ten minutes to boot,
        and the web server after it does not switch until it is ready. Started once the phase 1 shot is taken
        (its copies would otherwise slow that one down)."""
        ora, web2 = replica_named("db-ora-01"), replica_named("web-02")
        lab.set_vm_options(ora.vm_id, tools_installed=True, boot_seconds=600, shutdown_seconds=2, shutdown_hangs=False)
        lab.set_vm_options(web2.vm_id, shutdown_seconds=1, shutdown_hangs=False)
        return plans.start_plan(
            olivia,
            name="Wave 3: orders",
            guest_gate="guest",
            guest_gate_timeout_s=900,
            reason="CHG-4721",
            members=[
                {
                    "replica_id": r.pk,
                    "vm_name": r.source_name,
                    "target_host": "esx-prod-01",
                    "target_datastore": "prod-ds-01",
                    "network_map": network_map(r),
                }
                for r in (ora, web2)
            ],
        )

    def switch_to_the_gate(gated):
        members = list(FailbackSession.objects.filter(plan=gated).order_by("plan_order").values_list("pk", flat=True))
        for pk in members:
            wait_status(pk, SessionStatus.READY_TO_SWITCH)
        plans.switch_now(olivia, gated.pk, reason="CHG-4721 orders back to production")
        wait_status(members[0], SessionStatus.FAILBACK)  # up on production; the next waits for its guest
        print(f"plan {gated.name} waits at its guest-ready gate")

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = (
        "true"  # Playwright's loop runs in this thread; the servers never see this
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=portal.url, viewport={"width": 1280, "height": 800})
        context.add_init_script(INIT_SCRIPT)
        page = context.new_page()
        page.on("dialog", lambda d: d.accept())
        page.goto("/accounts/login/")
        page.fill("#id_username", "olivia")
        page.fill("#id_password", "olivia-pass-1234")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(lambda url: "/accounts/login/" not in url)

        def shot(name, path=None, settle=True, full_page=True):
            if path:
                page.goto(path)
            page.wait_for_load_state("networkidle" if settle else "load")
            target = out / f"{name}.png"
            page.screenshot(path=str(target), full_page=full_page)
            print(
                f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: {target.stat().st_size // 1024} KiB"
            )

        shot("session-windows", f"/sessions/{fitting}/")  # the windows, the budget, why it waits, the warning

        def first_disk_percent():
            return FailbackSession.objects.get(pk=running).disks.order_by("key").first().percent

        deadline = time.monotonic() + 240
        while first_disk_percent() < 45 and time.monotonic() < deadline:
            time.sleep(0.5)
        page.goto(f"/sessions/{running}/")
        wait_in_page(page, "window.__ws.messages >= 2")  # live figures (rate, time left) have arrived
        shot("session-phase1", settle=False)
        gated = start_gated_plan()
        page.goto("/")
        wait_in_page(page, "window.__ws.messages >= 1")
        shot("dashboard", settle=False)
        shot("replicas", "/replicas/")
        shot("start-failback", f"/replicas/{replica_named('app-hr-01').pk}/failback/")
        page.get_by_role("button", name="Review the failback").click()
        page.get_by_role("button", name="Start failback").wait_for()
        shot("start-review")  # everything that will happen, and the checks, before anything starts
        shot("session-failback", f"/sessions/{waiting}/")
        shot("session-ready", f"/sessions/{scheduled}/")
        page.get_by_role("button", name="Switch now").first.click()
        page.locator("dialog[open]").wait_for()
        shot(
            "session-dialog", settle=False, full_page=False
        )  # the consequence stated with this session's names and figures
        shot("sessions", "/sessions/")
        shot("plan", f"/plans/{plan.pk}/")
        switch_to_the_gate(gated)
        shot("plan-gate", f"/plans/{gated.pk}/")  # the switch waits at the guest-ready gate, and says for whom
        shot("audit", "/audit/?replica=web-01")  # one session's rows, its refused commit included: the filters in use
        # Four eyes: Omar asked to undo web-01's failback; Olivia, another Operator, may approve or reject it.
        from failback import approvals

        approvals.set_rule(ada, "undo")
        try:
            workflow.undo(make_user("omar", "Operator"), waiting, reason="CHG-4712 users report slow logins")
        except approvals.ApprovalRequested:
            pass
        shot("approvals", "/approvals/")
        page.goto(f"/sessions/{committed}/report/")  # a hook's run and its output among the session's steps
        page.get_by_text("lb-01: pool erp set to drain").first.scroll_into_view_if_needed()
        shot("report-hooks", settle=True, full_page=False)
        page.get_by_role("heading", name="Signed evidence").scroll_into_view_if_needed()
        shot("report-evidence", settle=True, full_page=False)  # the evidence file, its digest and public key
        page.emulate_media(media="print")  # the report as it prints (no navigation bar, compact tables)
        shot("report", f"/sessions/{committed}/report/")
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE")
    return portal


if __name__ == "__main__":
    main()
