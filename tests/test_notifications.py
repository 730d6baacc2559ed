"""Notifications: real lab failbacks tell a real SMTP server and a real HTTP server on loopback.

Mails go through Django's SMTP backend to aiosmtpd; webhooks are checked for their HMAC-SHA256 signature
by the receiver; an endpoint that is down or too slow is retried with backoff while the failback finishes
as if nothing happened. The assertions are on what the servers received and on the recorded rows.
"""

import json
import os
import time
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from django_q.conf import Conf
from django_q.models import Schedule
from django_q.scheduler import scheduler
from hypothesis import given
from hypothesis import settings as settings_hypothesis
from hypothesis import strategies as st

from failback import automatic, workflow
from failback import tasks as failback_tasks
from failback.choices import CommitPolicy, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession
from failback.notifications import config, delivery, events, signing
from failback.notifications.models import Delivery, Notification, NotificationEndpoint, NotifyEvent

from .conftest import kill_cluster, start_cluster, wait_for
from .helpers import put_session_in, replica_named, start
from .notify_support import SmtpServer, WebhookReceiver, free_port

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

ALL = list(NotifyEvent.values)


@pytest.fixture
def smtp(settings):
    with SmtpServer() as server:
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", server.port
        settings.EMAIL_TIMEOUT = 5
        yield server.mailbox


@pytest.fixture
def fast_retries(settings):
    settings.FAILBACK_NOTIFY_RETRY_S = 0.2
    settings.FAILBACK_WEBHOOK_TIMEOUT_S = 0.5


def webhook(admin, url, events=ALL, secret="s3cret-for-tests"):
    endpoint = NotificationEndpoint(name=f"hook-{url[-12:]}", kind="webhook", url=url, events=list(events))
    config.save_endpoint(admin, endpoint, secret=secret)
    return endpoint


def fire_due_retries():
    """Time passes for the retries: their schedules are made due and django-q2's scheduler runs them."""
    Schedule.objects.filter(name__startswith="notify-retry-").update(next_run=timezone.now() - timedelta(seconds=1))
    Delivery.objects.filter(status=Delivery.Status.RETRYING).update(next_attempt_at=timezone.now())
    scheduler()


def test_it_mails_a_subscriber_every_step_of_a_failback_through_smtp(lab, operator, viewer, client, smtp):
    client.force_login(viewer)
    answer = client.post(
        reverse("failback:my_notifications"),
        {
            "email": "victor@example.org",
            "events": ["started", "ready_to_switch", "switch_started", "switch_finished", "committed"],
        },
    )
    assert answer.status_code == 302
    session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO)
    workflow.commit(operator, session.pk, reason="app team confirmed")
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.COMMITTED
    got = smtp.subjects("victor@example.org")
    assert [m["event"] for m in smtp.messages] == [
        "started",
        "ready_to_switch",
        "switch_started",
        "switch_finished",
        "committed",
    ]
    assert got[1].startswith(f"[DR portal] Ready to switch: failback #{session.pk}") and "predicted downtime" in got[1]
    assert "not predicted yet" not in got[1]  # a figure, worked out from phase 1's rates
    assert "window" in got[3] and " s" in got[3]
    committed = smtp.messages[4]
    assert "app team confirmed" in committed["body"] and "Decided by olivia" in committed["body"]
    row = AuditEvent.objects.get(action="notify_subscription")
    assert row.actor == viewer and "Committed" in row.detail


def test_it_posts_signed_webhooks_that_a_receiver_verifies(lab, operator, admin_user, client):
    receiver = WebhookReceiver().start()
    try:
        client.force_login(admin_user)
        answer = client.post(
            reverse("failback:notify_endpoint_new"),
            {"name": "on-call", "kind": "webhook", "url": receiver.url, "events": ALL, "active": "on"},
        )
        assert answer.status_code == 200 and answer.context["secret"]  # generated, shown once
        receiver.secret = answer.context["secret"]
        endpoint = NotificationEndpoint.objects.get(name="on-call")
        assert receiver.secret not in endpoint.secret_encrypted and endpoint.reveal_secret() == receiver.secret
        saved = AuditEvent.objects.get(action="notify_endpoint_saved")
        assert receiver.secret not in json.dumps(saved.data) + saved.detail
        session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.MANUAL)
        workflow.switch_now(operator, session.pk, reason="CHG-16")
        workflow.undo(operator, session.pk, reason="app broken")
    finally:
        receiver.stop()
    assert receiver.events() == ["started", "ready_to_switch", "switch_started", "switch_finished", "undone"]
    assert all(r["valid"] for r in receiver.requests)
    ready = receiver.requests[1]["json"]
    assert ready["session"]["id"] == session.pk and ready["predicted_downtime_s"] >= 0
    finished = receiver.requests[3]["json"]
    window = FailbackSession.objects.get(pk=session.pk).switch_window.total_seconds()
    assert finished["window_s"] == pytest.approx(window, abs=0.01)
    # What the receiver's check refuses: a tampered body, another secret, the same request replayed later.
    first = receiver.requests[0]
    ts, sig = first["headers"][signing.TIMESTAMP_HEADER], first["headers"][signing.SIGNATURE_HEADER]
    assert signing.verify(receiver.secret, ts, sig, first["body"])
    assert not signing.verify(receiver.secret, ts, sig, first["body"].replace(b"started", b"stopped"))
    assert not signing.verify("another-secret", ts, sig, first["body"])
    assert not signing.verify(receiver.secret, ts, sig, first["body"], now=int(ts) + signing.TOLERANCE_S + 1)
    assert all(d.status == "delivered" and d.attempts == 1 for d in Delivery.objects.all())


def test_a_down_endpoint_is_retried_with_backoff_and_the_failback_completes(lab, operator, admin_user, fast_retries):
    port = free_port()  # nothing listens there yet
    webhook(admin_user, f"http://127.0.0.1:{port}/hooks/dr", events=["started", "committed"])
    session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO)
    workflow.commit(operator, session.pk)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.COMMITTED  # nothing held it up
    pending = Delivery.objects.order_by("pk")
    assert [d.status for d in pending] == ["retrying", "retrying"]
    first = pending[0].attempt_rows.get()
    assert not first.ok and "ConnectionRefusedError" in first.error
    fire_due_retries()  # still down: the second attempt fails, and the next waits twice as long
    again = Delivery.objects.get(pk=pending[0].pk)
    second = again.attempt_rows.get(number=2)
    assert again.attempts == 2 and not second.ok
    assert again.next_attempt_at - second.at >= timedelta(seconds=0.4) - timedelta(milliseconds=50)
    receiver = WebhookReceiver(secret="s3cret-for-tests", port=port).start()
    try:
        fire_due_retries()
    finally:
        receiver.stop()
    assert sorted(receiver.events()) == ["committed", "started"] and all(r["valid"] for r in receiver.requests)
    done = Delivery.objects.get(pk=pending[0].pk)
    assert done.status == "delivered" and [a.ok for a in done.attempt_rows.all()] == [False, False, True]
    assert done.attempt_rows.get(number=3).status_code == 200
    assert not Schedule.objects.filter(name__startswith="notify-retry-").exists()


def test_a_slow_endpoint_times_out_and_gives_up_after_its_attempts(lab, operator, admin_user, fast_retries, settings):
    settings.FAILBACK_NOTIFY_ATTEMPTS = 2
    receiver = WebhookReceiver(secret="s3cret-for-tests", delay=1.5).start()
    try:
        webhook(admin_user, receiver.url, events=["switch_started"])
        session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO)
        assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK
        fire_due_retries()
    finally:
        receiver.stop()
    gave_up = Delivery.objects.get()
    assert gave_up.status == "failed" and gave_up.next_attempt_at is None
    attempts = list(gave_up.attempt_rows.all())
    assert len(attempts) == 2 and all("timed out" in a.error or "TimeoutError" in a.error for a in attempts)
    assert len(receiver.requests) == 2 and all(r["valid"] for r in receiver.requests)
    # The same delivery handed to a worker again sends nothing more.
    delivery.deliver(gave_up.pk)
    assert gave_up.attempt_rows.count() == 2


def test_it_tells_the_moments_nobody_clicks_once_each(lab, operator, admin_user, smtp, settings):
    settings.FAILBACK_NOTIFY_WAITING_MINUTES = 30
    settings.FAILBACK_NOTIFY_POLICY_MINUTES = 15
    team = NotificationEndpoint(name="team", kind="email", addresses="dr-team@example.org", events=ALL)
    config.save_endpoint(admin_user, team)
    waiting = put_session_in(start(operator, replica_named("app-crm")), SessionStatus.FAILBACK)
    FailbackSession.objects.filter(pk=waiting.pk).update(phase2_ended_at=timezone.now() - timedelta(minutes=31))
    policy = put_session_in(start(operator, replica_named("app-erp")), SessionStatus.FAILBACK)
    FailbackSession.objects.filter(pk=policy.pk).update(
        phase2_ended_at=timezone.now(),
        commit_policy=CommitPolicy.AUTO_UNDO,
        commit_after_min=20,
        policy_due_at=timezone.now() + timedelta(minutes=10),
    )
    when = timezone.now() + timedelta(hours=2)
    scheduled = start(operator, replica_named("web-01"), switch_mode=SwitchMode.SCHEDULED, switch_at=when)
    assert FailbackSession.objects.get(pk=scheduled.pk).status == SessionStatus.READY_TO_SWITCH
    lab.set_host_state("esx-prod-01", "maintenance")
    failback_tasks.readiness()  # the every-minute readiness job re-runs the switch checks
    smtp.messages.clear()
    schedule = Schedule.objects.get(name="failback-notifications")  # the worker's every-minute look
    assert schedule.func == "failback.notifications.tasks.periodic" and schedule.minutes == 1
    told = events.periodic()
    assert events.periodic() == []  # a second look tells nothing twice
    assert sorted(n.event for n in told) == ["policy_soon", "precheck_failed", "waiting"]
    subjects = sorted(smtp.subjects("dr-team@example.org"))
    assert any(s.startswith("[DR portal] Automatic undo in 10 min") for s in subjects)
    assert any(s.startswith("[DR portal] Waiting for commit or undo for 31 min") for s in subjects)
    check = next(m for m in smtp.messages if m["event"] == "precheck_failed")
    assert "esx-prod-01 is in maintenance mode" in check["body"]
    # Thirty minutes later the waiting session is told again, and the other switched one for the first time.
    again = events.periodic(now=timezone.now() + timedelta(minutes=30))
    assert sorted(n.key for n in again) == sorted([f"waiting-{waiting.pk}-2", f"waiting-{policy.pk}-1"])
    # The switch's moment comes with the host still in maintenance: the checks hold it back, and that is told.
    FailbackSession.objects.filter(pk=scheduled.pk).update(switch_at=timezone.now() - timedelta(seconds=1))
    automatic.scheduled_switch_due(scheduled.pk)
    assert FailbackSession.objects.get(pk=scheduled.pk).status == SessionStatus.READY_TO_SWITCH
    held = smtp.messages[-1]
    assert held["event"] == "precheck_failed" and "blocked by the pre-switch checks" in held["body"]


def test_it_tells_a_failure_with_its_reason_and_a_cancel(lab, operator, admin_user, smtp):
    config.save_endpoint(
        admin_user,
        NotificationEndpoint(name="team", kind="email", addresses="ops@example.org", events=["failed", "cancelled"]),
    )
    replica = replica_named("app-crm")
    lab.set_host_state("esx-prod-01", "maintenance")
    with pytest.raises(workflow.Refused):
        start(operator, replica)  # refused before it started: nothing to tell
    lab.set_host_state("esx-prod-01", "connected")
    session = start(operator, replica, switch_mode=SwitchMode.MANUAL)
    workflow.cancel(operator, session.pk, reason="window moved")
    assert [m["event"] for m in smtp.messages] == ["cancelled"]
    erp = replica_named("app-erp")
    disk = lab.vm_config(erp.vm_id).disks[0]
    os.unlink(lab.disk_path(erp.vm_id, disk.key))  # the replica's disk is gone: phase 1 cannot read it
    failed = FailbackSession.objects.get(pk=start(operator, erp, switch_mode=SwitchMode.MANUAL).pk)
    assert failed.status == SessionStatus.FAILED
    mail = smtp.messages[-1]
    assert mail["event"] == "failed" and mail["subject"].startswith(
        f"[DR portal] Failback failed: failback #{failed.pk}"
    )
    assert "Reason: " in mail["body"] and failed.error.split(": ", 1)[-1] in mail["body"]


def test_a_mail_server_that_is_down_costs_the_failback_nothing(lab, operator, settings, fast_retries):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nothing listens
    config.set_subscription(operator, ["started", "switch_finished", "committed"], email="olivia@example.org")
    session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO)
    workflow.commit(operator, session.pk)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.COMMITTED
    waiting = Delivery.objects.order_by("pk")
    assert [d.status for d in waiting] == ["retrying"] * 3 and all(d.channel == "email" for d in waiting)
    assert all("ConnectionRefusedError" in d.attempt_rows.get().error for d in waiting)
    with SmtpServer() as server:  # the mail server is back: the retries get through
        settings.EMAIL_PORT = server.port
        fire_due_retries()
    assert [m["event"] for m in server.mailbox.messages] == ["started", "switch_finished", "committed"]
    assert [d.status for d in Delivery.objects.all()] == ["delivered"] * 3


@settings_hypothesis(max_examples=50, deadline=None)
@given(secret=st.text(min_size=1, max_size=40), body=st.binary(max_size=300), flip=st.integers(min_value=0))
def test_a_signature_checks_out_only_for_the_same_secret_timestamp_and_bytes(secret, body, flip):
    ts = 1_800_000_000
    sig = signing.sign(secret, ts, body)
    assert signing.verify(secret, str(ts), sig, body, now=ts)
    assert not signing.verify(secret, str(ts + 1), sig, body, now=ts)  # another timestamp
    assert not signing.verify(secret + "x", str(ts), sig, body, now=ts)
    if body:
        i = flip % len(body)
        changed = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        assert not signing.verify(secret, str(ts), sig, changed, now=ts)


def test_only_administrators_manage_endpoints_and_see_deliveries(lab, operator, viewer, admin_user, client):
    client.force_login(viewer)
    assert client.get(reverse("failback:my_notifications")).status_code == 200  # everyone chooses their own
    client.force_login(operator)
    for name in ("notify_endpoints", "notify_endpoint_new", "notify_deliveries"):
        assert client.get(reverse(f"failback:{name}")).status_code == 403
    assert (
        client.post(
            reverse("failback:notify_endpoint_new"), {"name": "x", "kind": "webhook", "url": "http://127.0.0.1:9/"}
        ).status_code
        == 403
    )
    assert not NotificationEndpoint.objects.exists()
    with pytest.raises(workflow.Refused):
        config.save_endpoint(viewer, NotificationEndpoint(name="x", kind="email", addresses="a@example.org"))
    with pytest.raises(workflow.Refused, match="http:// or https://"):
        config.save_endpoint(admin_user, NotificationEndpoint(name="x", kind="webhook", url="ftp://127.0.0.1/x"))
    assert AuditEvent.objects.filter(action="notify_endpoint_saved", outcome="refused").count() == 2
    port = free_port()
    endpoint = webhook(admin_user, f"http://127.0.0.1:{port}/hooks/dr", events=["started"])
    start(operator, replica_named("app-crm"))
    client.force_login(admin_user)
    listing = client.get(reverse("failback:notify_endpoints")).content.decode()
    assert endpoint.name in listing and endpoint.url in listing
    edit = client.get(reverse("failback:notify_endpoint", args=[endpoint.pk])).content.decode()
    assert "s3cret-for-tests" not in edit and endpoint.secret_encrypted not in edit  # never rendered back
    changed = client.post(
        reverse("failback:notify_endpoint", args=[endpoint.pk]),
        {
            "name": endpoint.name,
            "kind": "webhook",
            "url": endpoint.url,
            "events": ["started", "failed"],
            "active": "on",
        },
    )
    assert changed.status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.events == ["started", "failed"] and endpoint.reveal_secret() == "s3cret-for-tests"  # kept
    page = client.get(reverse("failback:notify_deliveries")).content.decode()
    assert "ConnectionRefusedError" in page and "Retrying" in page and endpoint.name in page
    assert client.post(reverse("failback:notify_endpoint_delete", args=[endpoint.pk])).status_code == 302
    assert not NotificationEndpoint.objects.exists() and Delivery.objects.count() == 1  # the record stays
    assert AuditEvent.objects.filter(action="notify_endpoint_deleted", actor=admin_user).count() == 1
    assert Notification.objects.get().event == "started"


@pytest.mark.process
def test_the_worker_delivers_and_retries_while_it_runs_the_failback(
    lab, operator, admin_user, settings, monkeypatch, tmp_path
):
    monkeypatch.setattr(Conf, "SYNC", False)  # a real qcluster process runs every step and every delivery
    receiver = WebhookReceiver(secret="s3cret-for-tests", fail_first=1).start()
    log = tmp_path / "cluster.log"
    cluster = start_cluster(
        settings,
        log,
        FAILBACK_NOTIFY_RETRY_S="0.5",
        FAILBACK_CREDENTIALS_KEYS=",".join(settings.FAILBACK_CREDENTIALS_KEYS),
    )
    try:
        webhook(admin_user, receiver.url, events=["started", "ready_to_switch", "switch_started", "switch_finished"])
        session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO)
        wait_for(lambda: FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK, what="the switch")
        # The session reads Failback a moment before the worker queues switch_finished's delivery: wait for
        # all four rows, or the loop below may find the first three delivered and stop before the last exists.
        wait_for(lambda: Delivery.objects.count() >= 4, what="a delivery for each of the four events")
        deadline = time.monotonic() + 60
        while Delivery.objects.exclude(status="delivered").exists() and time.monotonic() < deadline:
            fire_due_retries()  # the scheduler's round, sooner than its 30 s cadence; the worker sends
            time.sleep(0.3)
    finally:
        kill_cluster(cluster)
        receiver.stop()
        print(log.read_text()[-4000:])
    assert sorted(set(receiver.events())) == ["ready_to_switch", "started", "switch_finished", "switch_started"]
    assert all(r["valid"] for r in receiver.requests)
    assert [d.status for d in Delivery.objects.all()] == ["delivered"] * 4
    retried = [d for d in Delivery.objects.all() if d.attempts == 2]
    assert len(retried) == 1 and retried[0].attempt_rows.get(number=1).status_code == 503
