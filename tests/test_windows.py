"""Switch when it fits: maintenance windows, a downtime budget, and writes that outpace the copy (issue 17, part 1).

On the real lab with inline workers. Time is moved by handing the readiness tick (``automatic.switch_when_fits``)
the moment it decides at, as the scheduler would call it then: no sleeping, no clock patched.
"""

import re
from datetime import UTC, datetime, time, timedelta

import pytest
from django.core import mail
from django.utils import timezone

from failback import automatic, jobs, windows
from failback.choices import Outcome, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession
from failback.notifications import config
from failback.notifications.models import Notification, NotificationEndpoint
from failback.workflow import Refused

from .helpers import replica_named, start

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.beyond]

MiB = 2**20


def one_off(day, start, end, tz="UTC"):
    return {"kind": "once", "start": f"{day:%Y-%m-%d}T{start}", "end": f"{day:%Y-%m-%d}T{end}", "tz": tz}


def at(day, clock):
    return datetime.combine(day, time.fromisoformat(clock), tzinfo=UTC)


@pytest.fixture
def told(admin_user):
    """An e-mail endpoint for the two new events (delivered to Django's test outbox)."""
    config.save_endpoint(
        admin_user,
        NotificationEndpoint(
            name="dr-team", kind="email", addresses="dr@example.org", events=["window_missed", "convergence"]
        ),
    )
    return mail.outbox


def test_it_misses_a_window_the_budget_does_not_fit_then_switches_in_the_next(lab, operator, told):
    replica = replica_named("web-01")
    lab.set_vm_options(replica.vm_id, tools_installed=True, shutdown_seconds=240, shutdown_hangs=False, workload=False)
    session = start(operator, replica, shutdown_timeout_s=600)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.READY_TO_SWITCH
    day1 = timezone.now().date() + timedelta(days=2)
    day2 = day1 + timedelta(days=1)
    windows.set_session_rules(
        operator,
        session.pk,
        windows=[one_off(day1, "02:00", "04:00"), one_off(day2, "02:00", "04:00")],
        budget_s=120,
        reason="CHG-17 nights only",
    )
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.switch_mode == SwitchMode.AUTO and session.downtime_budget_s == 120

    jobs.run_readiness(session.pk, catch_up=False)
    assert FailbackSession.objects.get(pk=session.pk).predicted_window_s >= 240
    assert automatic.switch_when_fits(session.pk, now=at(day1, "01:00")) is None  # before the window: nothing
    assert automatic.switch_when_fits(session.pk, now=at(day1, "02:30")) is None  # inside: it does not fit
    waiting = AuditEvent.objects.get(session=session, action="window_waiting")
    # 240 s of guest shutdown, plus the final delta and power-on (a second or two on a busy machine)
    assert re.search(r"predicted 24\d s against a budget of 120 s", waiting.detail), waiting.detail
    automatic.switch_when_fits(session.pk, now=at(day1, "02:31"))  # a second look inside says nothing new
    assert AuditEvent.objects.filter(session=session, action="window_waiting").count() == 1

    automatic.switch_when_fits(session.pk, now=at(day1, "05:00"))  # the window has passed
    missed = AuditEvent.objects.get(session=session, action="window_missed")
    assert missed.outcome == Outcome.INFO
    assert re.search(r"passed without the switch: predicted 24\d s against a budget of 120 s", missed.detail)
    assert "guest shutdown 240 s" in missed.detail and f"Next window: {day2:%a %Y-%m-%d} 02:00" in missed.detail
    assert missed.data["budget_s"] == 120 and missed.data["next"]["start"] == at(day2, "02:00").isoformat()
    assert Notification.objects.filter(session=session, event="window_missed").count() == 1
    assert any("Maintenance window missed" in m.subject for m in told)
    automatic.switch_when_fits(session.pk, now=at(day1, "06:00"))
    assert AuditEvent.objects.filter(session=session, action="window_missed").count() == 1  # told once

    # The admin makes the guest shut down quickly; the next prediction fits and the next window is met.
    lab.set_vm_options(replica.vm_id, shutdown_seconds=1)
    jobs.run_readiness(session.pk, catch_up=False)
    assert automatic.switch_when_fits(session.pk, now=at(day2, "01:59")) is None  # not yet inside
    automatic.switch_when_fits(session.pk, now=at(day2, "02:10"))
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == SessionStatus.FAILBACK
    switch = AuditEvent.objects.get(session=session, action="switch", outcome=Outcome.OK)
    assert switch.actor is None and switch.data["trigger"] == "window" and switch.data["budget_s"] == 120
    assert (
        f"in the maintenance window {day2:%a %Y-%m-%d} 02:00" in switch.detail and "within the budget" in switch.detail
    )
    measured = AuditEvent.objects.get(session=session, action="switch_window")  # budget, predicted, actual together
    assert measured.data["budget_s"] == 120 and measured.data["predicted_s"] is not None
    assert measured.data["seconds"] == pytest.approx(session.switch_window.total_seconds(), abs=1e-3)
    assert "budget 120 s (within)" in measured.detail


@pytest.fixture
def bigger_lab(db, settings):
    import os

    from django.core.management import call_command

    from failback.hypervisors.lab import LabHypervisor

    call_command("seed_lab", "--count", "2", "--scale", "0.25", "--no-user", stdout=open(os.devnull, "w"))
    return LabHypervisor(settings.LAB_ROOT)


def test_it_warns_when_a_vm_is_written_faster_than_the_copy(bigger_lab, operator, told, client):
    lab = bigger_lab
    replica = max(FailbackSession.replica.field.related_model.objects.all(), key=lambda r: r.disks.count())
    lab.set_vm_options(replica.vm_id, workload=False, cbt=True)
    session = start(operator, replica)
    first = jobs.run_readiness(session.pk, catch_up=False)
    assert FailbackSession.objects.get(pk=session.pk).prediction["convergence"] is None  # nothing written yet
    assert first["changed_bytes"] < windows.MIN_PENDING_BYTES

    # The link is limited to 1 MB/s; a catch-up has just run, and the guest writes 32 MiB to its last disk at once.
    FailbackSession.objects.filter(pk=session.pk).update(bandwidth_mbps=1, catchup_at=timezone.now())
    disk = replica.disks.order_by("key").last()
    assert disk.capacity_bytes >= 32 * MiB
    for offset in range(0, 32 * MiB, MiB):
        lab.guest_write(replica.vm_id, disk.key, offset, b"\x5a" * MiB)
    jobs.run_readiness(session.pk, catch_up=False)
    session = FailbackSession.objects.get(pk=session.pk)
    found = session.prediction["convergence"]
    assert [d["disk"] for d in found["disks"]] == [disk.key] and found["write_bps"] > found["copy_bps"] <= 1_000_000
    assert f"the write rate on disk {disk.key}" in found["text"] and "is outpacing the copy rate (" in found["text"]
    warning = AuditEvent.objects.get(session=session, action="convergence_warning")
    assert warning.outcome == Outcome.INFO and found["text"] in warning.detail
    assert Notification.objects.filter(session=session, event="convergence").count() == 1
    jobs.run_readiness(session.pk, catch_up=False)  # still outpacing: not said again
    assert AuditEvent.objects.filter(session=session, action="convergence_warning").count() == 1

    # Before anyone presses Switch: the page and the API say so.
    client.force_login(operator)
    page = client.get(f"/sessions/{session.pk}/").content.decode()
    assert "Writes outpace the copy" in page and f"the write rate on disk {disk.key}" in page
    from failback import api_render

    assert api_render.fresh_session(session.pk)["convergence"]["text"] == found["text"]


def test_it_warns_when_a_vm_without_change_tracking_is_written_faster_than_the_copy(bigger_lab, operator, told):
    lab = bigger_lab
    replica = max(FailbackSession.replica.field.related_model.objects.all(), key=lambda r: r.disks.count())
    lab.set_vm_options(replica.vm_id, workload=False, cbt=False)  # no change tracking: digest deltas
    session = start(operator, replica)
    FailbackSession.objects.filter(pk=session.pk).update(bandwidth_mbps=1)  # the link is limited to 1 MB/s now
    jobs.run_readiness(session.pk, catch_up=True)  # a first catch-up pass: nothing changed, nothing said
    session = FailbackSession.objects.get(pk=session.pk)
    assert set(session.prediction["catchup"]["methods"].values()) == {"digest"}
    assert session.prediction["convergence"] is None

    disk = replica.disks.order_by("key").last()  # the guest writes 32 MiB, then the next pass finds them
    for offset in range(0, 32 * MiB, MiB):
        lab.guest_write(replica.vm_id, disk.key, offset, bytes([offset // MiB + 1]) * MiB)
    jobs.run_readiness(session.pk, catch_up=True)
    session = FailbackSession.objects.get(pk=session.pk)
    found = session.prediction["convergence"]
    (measured,) = found["disks"]
    assert measured["disk"] == disk.key and measured["method"] == "digest" and measured["changed_bytes"] >= 32 * MiB
    assert measured["measured_by"].startswith("the last digest catch-up: 32.0 MiB changed in")
    assert found["write_bps"] > found["copy_bps"] == 1_000_000  # the session's 1 MB/s limit
    assert f"the write rate on disk {disk.key}" in found["text"]
    warning = AuditEvent.objects.get(session=session, action="convergence_warning")
    assert found["text"] in warning.detail
    assert Notification.objects.filter(session=session, event="convergence").count() == 1


def test_it_refuses_bad_windows_and_budgets_with_a_clear_reason(lab, operator):
    session = start(operator, replica_named("web-01"))
    tomorrow = timezone.now().date() + timedelta(days=1)
    cases = [
        ([one_off(tomorrow, "04:00", "02:00")], None, "Window 1 refused: The window ends"),
        ([one_off(tomorrow, "02:00", "04:00", tz="Mars/Olympus")], None, "Unknown time zone 'Mars/Olympus'"),
        ([{"kind": "weekly", "days": ["mon"], "start": "05:00", "end": "01:00", "tz": "UTC"}], None, "is two windows"),
        ([{"kind": "weekly", "days": [], "start": "01:00", "end": "02:00", "tz": "UTC"}], None, "names its days"),
        ([], -5, "Downtime budget refused: -5 is not a positive number of seconds."),
    ]
    for rules, budget, message in cases:
        with pytest.raises(Refused) as refused:
            windows.set_session_rules(operator, session.pk, windows=rules, budget_s=budget)
        assert message in refused.value.message
    assert AuditEvent.objects.filter(action="set_switch_windows", outcome=Outcome.REFUSED).count() == len(cases)
    assert FailbackSession.objects.get(pk=session.pk).switch_windows == []


def test_it_sets_windows_through_the_api_and_refuses_bad_ones(lab, operator, client):
    from failback import tokens

    session = start(operator, replica_named("web-01"))
    _, secret = tokens.issue(operator, operator, "ci")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    url = f"/api/v1/sessions/{session.pk}/windows"
    body = {
        "windows": [{"kind": "weekly", "days": ["sat", "sun"], "start": "02:00", "end": "04:00", "tz": "Europe/Paris"}],
        "downtime_budget_s": 120,
        "reason": "CHG-9",
    }
    response = client.post(url, body, content_type="application/json", **auth)
    assert response.status_code == 200, response.content
    shown = response.json()["switch_windows"]
    assert shown["lines"] == ["weekly sat,sun 02:00-04:00 Europe/Paris"] and shown["budget_s"] == 120
    assert shown["next"]["label"].endswith("02:00–04:00 Europe/Paris") and response.json()["switch_mode"] == "auto"
    bad = {**body, "windows": [{**body["windows"][0], "tz": "Nowhere/City"}]}
    response = client.post(url, bad, content_type="application/json", **auth)
    assert response.status_code == 409 and "Unknown time zone 'Nowhere/City'" in response.json()["detail"]
    response = client.post(url, {**body, "downtime_budget_s": -1}, content_type="application/json", **auth)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "downtime_budget_s"


def test_a_plan_waits_for_a_window_where_its_downtime_fits(lab, operator, told):
    from failback import plans

    from .helpers import network_map

    members = [replica_named("web-01"), replica_named("app-crm")]
    for r in members:
        lab.set_vm_options(r.vm_id, tools_installed=True, shutdown_seconds=6, shutdown_hangs=False, workload=False)
    plan = plans.start_plan(
        operator,
        name="wave-nights",
        members=[
            {
                "replica_id": r.pk,
                "vm_name": f"{r.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(r),
            }
            for r in members
        ],
    )
    day1 = timezone.now().date() + timedelta(days=3)
    windows.set_plan_rules(
        operator, plan.pk, windows=[one_off(day1, "02:00", "03:00"), one_off(day1, "04:00", "05:00")], budget_s=8
    )
    sessions = list(plan.sessions.order_by("plan_order", "pk"))
    assert all(FailbackSession.objects.get(pk=s.pk).status == SessionStatus.READY_TO_SWITCH for s in sessions)
    for s in sessions:
        jobs.run_readiness(s.pk, catch_up=False)
    assert automatic.plan_switch_when_fits(plan.pk, now=at(day1, "02:30")) is None  # 2 x 6 s one after the other
    automatic.plan_switch_when_fits(plan.pk, now=at(day1, "03:30"))
    missed = AuditEvent.objects.get(action="window_missed")
    assert missed.session_id == sessions[0].pk and missed.data["plan"] == "wave-nights"
    assert "against a budget of 8 s" in missed.detail and "Next window" in missed.detail

    for r in members:
        lab.set_vm_options(r.vm_id, shutdown_seconds=0.5)
    for s in sessions:
        jobs.run_readiness(s.pk, catch_up=False)
    automatic.plan_switch_when_fits(plan.pk, now=at(day1, "04:05"))
    assert {FailbackSession.objects.get(pk=s.pk).status for s in sessions} == {SessionStatus.FAILBACK}
    switched = AuditEvent.objects.get(action="switch_plan", outcome=Outcome.OK)
    assert "(window)" in switched.detail and "within the budget of 8 s" in switched.detail
    for s in sessions:  # each member's measured window beside the plan's budget
        assert AuditEvent.objects.get(session_id=s.pk, action="switch_window").data["budget_s"] == 8


def test_a_fitting_switch_held_back_by_the_checks_is_retried_then_told_missed(lab, operator, told):
    replica = replica_named("web-01")
    lab.set_vm_options(replica.vm_id, workload=False)
    session = start(operator, replica)
    day = timezone.now().date() + timedelta(days=2)
    windows.set_session_rules(operator, session.pk, windows=[one_off(day, "02:00", "03:00")], budget_s=600)
    jobs.run_readiness(session.pk, catch_up=False)
    lab.set_host_state("esx-prod-01", "maintenance")  # the target host: a pre-switch check fails

    def attempts():
        return AuditEvent.objects.filter(session=session, action="switch", outcome=Outcome.REFUSED).count()

    automatic.switch_when_fits(session.pk, now=at(day, "02:05"))
    assert attempts() == 1 and FailbackSession.objects.get(pk=session.pk).status == SessionStatus.READY_TO_SWITCH
    automatic.switch_when_fits(session.pk, now=at(day, "02:06"))  # not every minute
    assert attempts() == 1
    automatic.switch_when_fits(session.pk, now=at(day, "02:16"))  # again after 10 min
    assert attempts() == 2
    automatic.switch_when_fits(session.pk, now=at(day, "03:01"))
    missed = AuditEvent.objects.get(session=session, action="window_missed")
    assert "pre-switch checks or an approval held the switch back" in missed.detail
    assert "No window is left" in missed.detail and missed.data["next"] is None


def test_a_window_that_passes_during_phase1_is_told_with_how_far_the_copy_came(lab, operator, told, monkeypatch):
    import threading

    from django.db import connection
    from django_q.conf import Conf

    from failback import workflow

    from .conftest import wait_for
    from .test_cancel_policy_checks import big_replica

    replica, _ = big_replica(lab)
    monkeypatch.setattr(Conf, "SYNC", False)  # queued, not run: this test plays the worker itself
    session = start(operator, replica, bandwidth_mbps=1)  # 1 MB/s: phase 1 still runs when the window ends
    day = timezone.now().date() + timedelta(days=2)
    rules = [one_off(day, "02:00", "04:00"), one_off(day + timedelta(days=1), "02:00", "04:00")]
    windows.set_session_rules(operator, session.pk, windows=rules, budget_s=600)

    def work():  # the worker's thread closes its own connection (PostgreSQL drops the test database after)
        try:
            jobs.run_phase1(session.pk)
        finally:
            connection.close()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        wait_for(lambda: session.disks.filter(bytes_done__gt=0).exists(), what="phase 1 copying")
        monkeypatch.setattr(Conf, "SYNC", True)  # what is told is routed inline; the cancel step runs inline too
        assert session.pk in automatic.copying_with_windows()  # the readiness tick looks at it too
        automatic.switch_when_fits(session.pk, now=at(day, "03:00"))  # inside, but phase 1 runs: nothing to say
        assert not AuditEvent.objects.filter(session=session, action="window_missed").exists()
        automatic.switch_when_fits(session.pk, now=at(day, "04:30"))
        missed = AuditEvent.objects.get(session=session, action="window_missed")
        assert re.search(
            r"02:00–04:00 UTC passed during phase 1 \(\d+ % copied; the switch cannot start", missed.detail
        )
        assert f"Next window: {day + timedelta(days=1):%a %Y-%m-%d} 02:00" in missed.detail
        assert (
            missed.data["during_phase1"]
            and missed.data["next"]["start"] == at(day + timedelta(days=1), "02:00").isoformat()
        )
        assert Notification.objects.filter(session=session, event="window_missed").count() == 1
        assert any("Maintenance window missed" in m.subject for m in told)
        automatic.switch_when_fits(session.pk, now=at(day, "04:31"))
        assert AuditEvent.objects.filter(session=session, action="window_missed").count() == 1  # told once
        shown = FailbackSession.objects.get(pk=session.pk).window_state["last_missed"]  # the page's "Last missed"
        assert "% copied" in shown["why"] and shown["next"] is not None
    finally:
        monkeypatch.setattr(Conf, "SYNC", True)  # the cancel step waits for the copy to let go
        workflow.cancel(operator, session.pk, reason="end of test")
        worker.join(30)


def test_a_plans_window_that_passes_before_its_members_are_ready_is_told(lab, operator, told, monkeypatch):
    from django_q.conf import Conf

    from failback import plans

    from .test_plans import NAMES, members

    monkeypatch.setattr(Conf, "SYNC", False)  # phase 1 queued, not run: every member is still copying
    plan = plans.start_plan(operator, name="wave-copying", members=members(lab, NAMES[:2]))
    day = timezone.now().date() + timedelta(days=2)
    windows.set_plan_rules(operator, plan.pk, windows=[one_off(day, "02:00", "04:00")], budget_s=60)
    automatic.plan_switch_when_fits(plan.pk, now=at(day, "04:30"))
    missed = AuditEvent.objects.get(action="window_missed")
    assert missed.session_id == plan.sessions.order_by("plan_order").first().pk and missed.data["plan"] == plan.name
    assert "passed during phase 1 (0 % copied, 0 of 2 members Ready to switch; the plan switches when all are)" in (
        missed.detail
    )
    assert "No window is left" in missed.detail
