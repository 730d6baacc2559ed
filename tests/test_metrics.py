"""/metrics: refused without the token or an allowed address; its figures are the database's rows after a
real lab failback, a watchdog resume, failed logins, and the websockets open on this process."""

from datetime import timedelta

import hypothesis
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from django.db import connections
from django.test import Client
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.conf import Conf
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from dr_portal.asgi import application
from failback import watchdog, workflow
from failback.choices import SessionStatus
from failback.models import FailbackSession, SessionDisk

from .helpers import replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

TOKEN = "s3cret-metrics-token-for-tests"


@pytest.fixture
def token(settings):
    settings.FAILBACK_METRICS_TOKEN = TOKEN
    settings.FAILBACK_METRICS_ALLOW = []
    return TOKEN


def scrape(**headers):
    return Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", **headers)


def samples():
    """{(name, (label pairs)): value} of one scrape."""
    response = scrape()
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")  # Prometheus' text format
    found = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name, **labels):
    return found[(name, tuple(sorted(labels.items())))]


@pytest.mark.security
def test_it_refuses_a_scrape_without_the_token(token, settings):
    assert Client().get("/metrics").status_code == 403
    wrong = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics-token-for-test")
    assert wrong.status_code == 403
    assert b"dr_portal" not in wrong.content
    assert Client().get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 403
    assert scrape().status_code == 200
    settings.FAILBACK_METRICS_TOKEN = ""  # no token configured: nobody gets in with any token
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403
    assert scrape().status_code == 403


@pytest.mark.security
def test_it_answers_an_allowed_address_without_a_token(settings):
    import ipaddress

    settings.FAILBACK_METRICS_TOKEN = ""
    settings.FAILBACK_METRICS_ALLOW = [ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("::1")]
    assert Client().get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert Client().get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert Client().get("/metrics", REMOTE_ADDR="10.2.0.1").status_code == 403
    assert Client().get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


def test_it_counts_what_a_real_lab_failback_wrote(lab, operator, token):
    replica = replica_named("app-erp")
    lab.set_vm_options(replica.vm_id, shutdown_seconds=0.2)
    session = start(operator, replica)  # phase 1 runs inline (django-q2's sync mode)
    lab.guest_write(replica.vm_id, session.disks.first().key, 0, b"written after phase 1" * 2000)
    workflow.switch_now(operator, session.pk)
    workflow.commit(operator, session.pk)
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == SessionStatus.COMMITTED, session.error

    found = samples()
    assert value(found, "dr_portal_sessions", status="committed") == 1
    assert value(found, "dr_portal_sessions", status="phase1") == 0
    disks = SessionDisk.objects.filter(session=session)
    phase1 = sum(d.phase1_bytes_written for d in disks)
    phase2 = sum(d.phase2_bytes_written for d in disks)
    assert phase1 > 0 and phase2 > 0
    assert value(found, "dr_portal_bytes_copied_total", phase="1") == phase1
    assert value(found, "dr_portal_bytes_copied_total", phase="2") == phase2
    window = session.switch_window.total_seconds()  # SQLite's date functions count whole milliseconds: abs=2e-3
    assert value(found, "dr_portal_switch_window_seconds_count") == 1
    assert value(found, "dr_portal_switch_window_seconds_sum") == pytest.approx(window, abs=2e-3)
    assert value(found, "dr_portal_switch_window_seconds_bucket", le="+Inf") == 1
    below = [b for b in (1, 2, 5, 10, 20, 30, 60) if window <= b]
    assert value(found, "dr_portal_switch_window_seconds_bucket", le=f"{below[0]}.0") == 1
    assert session.predicted_window_s is not None
    error = window - session.predicted_window_s
    assert value(found, "dr_portal_switch_prediction_error_seconds_count") == 1
    assert value(found, "dr_portal_switch_prediction_error_seconds_sum") == pytest.approx(abs(error), abs=2e-3)
    assert value(found, "dr_portal_switch_prediction_bias_seconds") == pytest.approx(error, abs=2e-3)


def test_it_counts_the_queue_and_the_steps_the_watchdog_resumed(lab, operator, token, monkeypatch):
    monkeypatch.setattr(Conf, "SYNC", False)  # tasks wait in the broker's queue: no worker runs here
    broker = get_broker()
    broker.purge_queue()
    try:
        session = start(operator, replica_named("app-crm"))
        queued = value(samples(), "dr_portal_queue_depth")
        assert queued >= 1  # phase 1 (and whatever else the start queued)
        assert queued == broker.queue_size()
        # No worker took phase 1 for longer than the stall limit: the watchdog queues it again.
        FailbackSession.objects.filter(pk=session.pk).update(enqueued_at=timezone.now() - timedelta(minutes=10))
        assert watchdog.recover_stalled() == [session.pk]
        found = samples()
        assert value(found, "dr_portal_watchdog_resumes_total", step="phase1") == 1
        assert value(found, "dr_portal_queue_depth") == broker.queue_size() >= queued + 1
        assert value(found, "dr_portal_sessions", status="queued") == 1
    finally:
        broker.purge_queue()  # this test's own queue (the ORM table, or its Redis database)


@pytest.mark.security
def test_it_counts_failed_logins(operator, token):
    for _ in range(3):
        Client().post("/accounts/login/", {"username": "olivia", "password": "wrong"}, REMOTE_ADDR="10.9.8.7")
    Client().post("/accounts/login/", {"username": "nobody", "password": "wrong"}, REMOTE_ADDR="10.9.8.6")
    assert value(samples(), "dr_portal_failed_logins") == 4


async def test_it_counts_the_websockets_open_on_this_process(lab, operator, token):
    session = await sync_to_async(lambda: start(operator, replica_named("app-crm")))()
    client = Client()
    await sync_to_async(client.force_login)(operator)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    headers = [(b"origin", b"http://localhost"), (b"cookie", cookie)]

    async def open_now():
        return value(await sync_to_async(samples)(), "dr_portal_websocket_clients")

    before = await open_now()
    sockets = [WebsocketCommunicator(application, f"/ws/sessions/{session.pk}/", headers=headers) for _ in range(2)]
    for ws in sockets:
        connected, _ = await ws.connect()
        assert connected
    refused = WebsocketCommunicator(application, f"/ws/sessions/{session.pk}/", headers=headers[:1])
    assert not (await refused.connect())[0]  # anonymous: refused, never counted
    assert await open_now() == before + 2
    for ws in sockets:
        await ws.disconnect()
    assert await open_now() == before
    await sync_to_async(connections.close_all)()  # the thread the consumers and this test read the database in


# When a session ended: not recorded, just now, within the settled margin, or long settled.
ENDED = [None, timedelta(0), timedelta(minutes=5), timedelta(hours=3), timedelta(days=2)]
MS = st.integers(min_value=1, max_value=4_000_000).map(lambda ms: ms / 1000)  # seconds, whole milliseconds


@hypothesis.settings(
    max_examples=25, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture]
)
@hypothesis.given(
    switches=st.lists(
        st.tuples(MS, st.one_of(st.none(), MS), st.booleans(), st.booleans(), st.sampled_from(ENDED)), max_size=6
    )
)
def test_the_switch_histograms_count_every_window_in_its_buckets(lab, operator, token, switches):
    """Windows and predictions of any size, opened when the replica began stopping (or, for a session from
    before that was recorded, when it was off) and closed at power-on (or at the end of phase 2); counted
    alike whether the session is part of the settled history (ended long ago: read once an hour and kept in
    the cache) or of what a scrape reads every time (ended lately, or no end recorded)."""
    from failback import metrics
    from failback.metrics import ERROR_BUCKETS, WINDOW_BUCKETS

    windows = [w for w, *_ in switches]
    misses = [abs(w - p) for w, p, *_ in switches if p is not None]
    hypothesis.assume(all(abs(v - b) > 1e-6 for v in windows + misses for b in WINDOW_BUCKETS + ERROR_BUCKETS))
    FailbackSession.objects.all().delete()
    replica, now = replica_named("app-crm"), timezone.now()
    t0 = now - timedelta(days=1)
    for i, (window, predicted, stop_recorded, powered_on, ended) in enumerate(switches):
        end = t0 + timedelta(seconds=window)
        FailbackSession.objects.create(
            ended_at=None if ended is None else now - ended,
            replica=replica,
            status=SessionStatus.COMMITTED,
            vm_name=f"prod-{i}",
            target_host="esx-prod-01",
            target_datastore="prod-ds-01",
            shutdown_timeout_s=60,
            started_by=operator,
            replica_stop_started_at=t0 if stop_recorded else None,
            replica_off_at=t0,
            phase2_ended_at=end,
            production_on_at=end if powered_on else None,
            predicted_window_s=predicted,
        )
    cache.delete(metrics.settled_key(metrics.settled_before(timezone.now())))  # this example's history, not the last's
    found = samples()
    assert value(found, "dr_portal_sessions", status="committed") == len(switches)
    assert value(found, "dr_portal_switch_window_seconds_count") == len(windows)
    assert value(found, "dr_portal_switch_window_seconds_sum") == pytest.approx(sum(windows), abs=1e-3)
    for bound in WINDOW_BUCKETS:
        expected = sum(1 for w in windows if w <= bound)
        assert value(found, "dr_portal_switch_window_seconds_bucket", le=f"{bound:.1f}") == expected
    assert value(found, "dr_portal_switch_prediction_error_seconds_count") == len(misses)
    assert value(found, "dr_portal_switch_prediction_error_seconds_sum") == pytest.approx(sum(misses), abs=1e-3)
    for bound in ERROR_BUCKETS:
        expected = sum(1 for m in misses if m <= bound)
        assert value(found, "dr_portal_switch_prediction_error_seconds_bucket", le=f"{bound:.1f}") == expected


def test_the_settled_history_grows_by_the_sessions_that_settled_since_the_last_step(lab, operator):
    """A step's first scrape adds to the previous step's cached figures the sessions that settled in between;
    the figures are those a full read gives, at every step."""
    from failback import metrics

    now = timezone.now()
    before = metrics.settled_before(now)
    previous = before - timedelta(seconds=metrics.SETTLED_STEP_S)
    replica = replica_named("app-crm")

    def ended(at, window_s):
        FailbackSession.objects.create(
            replica=replica,
            status=SessionStatus.COMMITTED,
            vm_name="prod",
            target_host="esx-prod-01",
            target_datastore="prod-ds-01",
            shutdown_timeout_s=60,
            started_by=operator,
            replica_off_at=at - timedelta(seconds=window_s),
            phase2_ended_at=at,
            ended_at=at,
        )

    ended(previous - timedelta(days=1), 3)  # settled at both steps
    ended(previous + timedelta(minutes=5), 40)  # settles between the two steps
    ended(now, 700)  # not settled
    hour_ago = metrics._session_figures(now - timedelta(seconds=metrics.SETTLED_STEP_S))
    assert cache.get(metrics.settled_key(previous))["window_n"] == 1
    assert cache.get(metrics.settled_key(before)) is None
    for figures in (hour_ago, metrics._session_figures(now)):
        assert figures["sessions"] == {"committed": 3}
        assert figures["window_n"] == 3 and figures["window_sum"] == pytest.approx(743)
        assert [figures[f"window_le_{i}"] for i in (1, 5, 6, 10)] == [0, 1, 2, 3]  # 2 s, 30 s, 60 s, 1800 s
    assert cache.get(metrics.settled_key(before))["window_n"] == 2  # the previous step's one, and the one since
