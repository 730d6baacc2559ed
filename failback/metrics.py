"""/metrics in Prometheus' text format, for a scrape that sends the token or comes from an allowed address.

Almost every figure is read from the database at scrape time (``PortalCollector``), not counted in
memory: the web and worker processes of every node write the same rows, so every node answers a
scrape with the same numbers, a restart loses nothing, and a process that died takes none of its
counts with it. Counts that only grow are counters (bytes copied, steps resumed); counts of what is
true now are gauges (sessions per status, queue depth). The switch windows and the prediction's error
are histograms over every switch on record. The settled part of that record (sessions ended more than
SETTLED_AFTER before the hour) is read once an hour and kept in Django's cache, shared by the nodes with
Redis; a scrape reads the rest.

One figure is this process's own: ``dr_portal_websocket_clients``, the websockets open on this web
process (``CountWebsockets`` wraps the websocket application in ``dr_portal/asgi.py``). Scrape every
web node and add them up (``sum(dr_portal_websocket_clients)``); the database figures are the same on
every node (``max`` them, or scrape one).
"""

import hmac
import ipaddress
import threading
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.core.cache import cache
from django.db import connection
from django.db.models import Case, Count, FloatField, Func, Q, Sum, When
from django.db.models.functions import Coalesce
from django.http import HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .choices import ACTIVE, TERMINAL, AuditAction, SessionStatus
from .models import AuditEvent, FailbackSession, SessionDisk

WINDOW_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
# |measured - predicted|, seconds (a histogram with negative buckets has no sum nor count in Prometheus' format:
# the sign goes into the bias gauge instead).
ERROR_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 300)


# -- websockets open on this process ------------------------------------------------------------


class _Gauge:
    def __init__(self):
        self.value, self.lock = 0, threading.Lock()

    def add(self, n):
        with self.lock:
            self.value += n


websocket_clients = _Gauge()


class CountWebsockets:
    """ASGI middleware: counts a websocket from its accept until its consumer returns (closed either side)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        accepted = False

        async def counting_send(message):
            nonlocal accepted
            if message.get("type") == "websocket.accept" and not accepted:
                accepted = True
                websocket_clients.add(1)
            await send(message)

        try:
            return await self.app(scope, receive, counting_send)
        finally:
            if accepted:
                websocket_clients.add(-1)


# -- figures read from the database -------------------------------------------------------------


def _sessions(figures):
    family = GaugeMetricFamily("dr_portal_sessions", "Failback sessions per status", labels=["status"])
    for status in SessionStatus:
        family.add_metric([status.value], figures["sessions"].get(status.value, 0))
    return family


def _bytes_copied(figures):
    done = CounterMetricFamily(
        "dr_portal_bytes_copied",
        "Bytes written to production disks by finished copies: phase 1 (full copy) and 2 (the switch's final delta)",
        labels=["phase"],
    )
    done.add_metric(["1"], figures["bytes_p1"])
    done.add_metric(["2"], figures["bytes_p2"])
    running = SessionDisk.objects.filter(session__status__in=[SessionStatus.PHASE1, SessionStatus.SWITCHING]).aggregate(
        p1=Sum("bytes_done", filter=_phase(1)), p2=Sum("bytes_done", filter=_phase(2))
    )
    moving = GaugeMetricFamily(
        "dr_portal_bytes_in_progress", "Bytes done so far by the copies running now", labels=["phase"]
    )
    moving.add_metric(["1"], running["p1"] or 0)
    moving.add_metric(["2"], running["p2"] or 0)
    return [done, moving]


def _phase(n):
    status = SessionStatus.PHASE1 if n == 1 else SessionStatus.SWITCHING
    return Q(phase=n, session__status=status)


class SecondsBetween(Func):
    """``end - start`` in seconds (float), in the database's own functions: an interval's epoch on PostgreSQL,
    julian days on SQLite (Django's own timestamp subtraction there is a Python function, called per row)."""

    arity = 2
    # EXTRACT gives a numeric on PostgreSQL 14+: summed and compared per bucket, numerics cost ~3x floats
    template = "CAST(EXTRACT(EPOCH FROM (%(expressions)s)) AS double precision)"
    arg_joiner = " - "
    output_field = FloatField()

    def as_sqlite(self, compiler, connection, **extra):
        end, start = (compiler.compile(e) for e in self.get_source_expressions())
        return f"((julianday({end[0]}) - julianday({start[0]})) * 86400.0)", [*end[1], *start[1]]


def _histogram(name, documentation, figures, key, buckets):
    """A histogram from the aggregate ``figures``: ``{key}_le_{i}`` per bucket, ``{key}_n`` and ``{key}_sum``."""
    family = HistogramMetricFamily(name, documentation)
    counts = [(_bound(b), figures[f"{key}_le_{i}"]) for i, b in enumerate(buckets)]
    family.add_metric([], [*counts, ("+Inf", figures[f"{key}_n"])], sum_value=figures[f"{key}_sum"])
    return family


def _bound(value):
    return floatToGoString(value)  # "1.0", "-2.0": as prometheus_client writes its own buckets


def _bucket(value, bounds):
    """SQL: the index of the first bound ``value`` is at or under (len(bounds) above them all; NULL if NULL).
    The bounds are this module's constants, written into the query as numbers."""
    whens = " ".join(f"WHEN {value} <= {float(bound)!r} THEN {i}" for i, bound in enumerate(bounds))
    return f"CASE WHEN {value} IS NULL THEN NULL {whens} ELSE {len(bounds)} END"


# A session ended this long ago is settled: its row and its disks' figures no longer change (a worker still
# running for it was fenced off by the lease long before). The settled history is read once per step (an hour)
# and kept in the cache; a scrape reads only what is not settled: sessions running, or ended within the last
# SETTLED_AFTER plus at most one step. A scrape then costs what the sessions of the last hour or two cost, not
# what every session on record costs (50,000 sessions: ~300 ms of aggregates per scrape on a loaded machine).
SETTLED_AFTER = timedelta(minutes=10)
SETTLED_STEP_S = 3600


def settled_before(now):
    """The settled history's bound: the start of the current step, less SETTLED_AFTER."""
    step_start = datetime.fromtimestamp(now.timestamp() // SETTLED_STEP_S * SETTLED_STEP_S, tz=UTC)
    return step_start - SETTLED_AFTER


def settled_key(before):
    return f"failback:metrics:settled:{before:%Y%m%dT%H%M%S}"


def _settled(before):
    return Q(status__in=TERMINAL, ended_at__lt=before)


def _unsettled(before):
    """Exactly the sessions ``_settled`` leaves out (every status is active or terminal), in a form the
    status and ended_at indexes answer."""
    return Q(status__in=ACTIVE) | Q(ended_at__isnull=True) | Q(ended_at__gte=before)


def _history_figures(sessions):
    """Sessions per status, switch windows and prediction misses per bucket (each bucket alone, not yet
    cumulative), their sums, and the bytes the sessions' disks wrote: for the sessions matching ``sessions``.
    One pass over those sessions: each row's window is worked out once and given the index of its bucket, and
    the database counts rows per (status, window bucket, error bucket)."""
    start = Coalesce("replica_stop_started_at", "replica_off_at")
    end = Coalesce("production_on_at", "phase2_ended_at")
    switched = Q(phase2_ended_at__isnull=False) & ~Q(replica_stop_started_at__isnull=True, replica_off_at__isnull=True)
    rows = (
        FailbackSession.objects.order_by()
        .filter(sessions)
        .annotate(window_s=Case(When(switched, then=SecondsBetween(end, start)), output_field=FloatField()))
        .values_list("status", "window_s", "predicted_window_s")
    )
    inner, params = rows.query.sql_with_params()
    w, p = '"window_s"', '"predicted_window_s"'
    error = f"CASE WHEN {w} IS NULL THEN NULL ELSE ABS({w} - {p}) END"
    # MATERIALIZED: each window is worked out once, not once per bucket (SQLite would otherwise inline it).
    sql = (
        f"WITH sessions AS MATERIALIZED ({inner}) "
        f"SELECT status, wb, eb, COUNT(*), SUM({w}), SUM({error}), SUM({w} - {p}) "
        f"FROM (SELECT *, {_bucket(w, WINDOW_BUCKETS)} AS wb, {_bucket(error, ERROR_BUCKETS)} AS eb "
        "FROM sessions) AS bucketed GROUP BY status, wb, eb"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        groups = cursor.fetchall()
    figures = {
        "sessions": {},
        "window_in": [0] * (len(WINDOW_BUCKETS) + 1),
        "error_in": [0] * (len(ERROR_BUCKETS) + 1),
        "window_n": 0,
        "window_sum": 0.0,
        "error_n": 0,
        "error_sum": 0.0,
        "bias_sum": 0.0,
    }
    for status, wb, eb, n, window_sum, error_sum, bias_sum in groups:
        figures["sessions"][status] = figures["sessions"].get(status, 0) + n
        if wb is None:  # not switched
            continue
        figures["window_in"][wb] += n
        figures["window_n"] += n
        figures["window_sum"] += float(window_sum or 0)
        if eb is not None:  # switched with a prediction
            figures["error_in"][eb] += n
            figures["error_n"] += n
            figures["error_sum"] += float(error_sum or 0)
            figures["bias_sum"] += float(bias_sum or 0)
    written = SessionDisk.objects.filter(session__in=FailbackSession.objects.filter(sessions)).aggregate(
        p1=Sum("phase1_bytes_written"), p2=Sum("phase2_bytes_written")
    )
    figures["bytes_p1"], figures["bytes_p2"] = written["p1"] or 0, written["p2"] or 0
    return figures


def _add(a, b):
    total = {k: (a[k] + b[k]) for k in a if k not in ("sessions", "window_in", "error_in")}
    total["sessions"] = {s: a["sessions"].get(s, 0) + b["sessions"].get(s, 0) for s in {*a["sessions"], *b["sessions"]}}
    for key in ("window_in", "error_in"):
        total[key] = [x + y for x, y in zip(a[key], b[key], strict=True)]
    return total


def _session_figures(now=None):
    """The history's figures: the settled part from the cache, the rest read now; with the cumulative bucket
    counts Prometheus wants. A step's first scrape adds the sessions that settled since the previous step to
    that step's figures (an hour's sessions, read through the ended_at index); only a cache that holds
    neither (a first scrape, a cache emptied) reads the whole settled history."""
    before = settled_before(now or timezone.now())
    key = settled_key(before)
    settled = cache.get(key)
    if settled is None:
        previous = before - timedelta(seconds=SETTLED_STEP_S)
        settled = cache.get(settled_key(previous))
        if settled is None:
            settled = _history_figures(_settled(before))
        else:
            settled = _add(settled, _history_figures(_settled(before) & Q(ended_at__gte=previous)))
        cache.set(key, settled, timeout=2 * SETTLED_STEP_S)
    figures = _add(settled, _history_figures(_unsettled(before)))
    for key, bounds in (("window", WINDOW_BUCKETS), ("error", ERROR_BUCKETS)):
        for i in range(len(bounds)):
            figures[f"{key}_le_{i}"] = sum(figures[f"{key}_in"][: i + 1])
    return figures


def _switches(figures):
    """Every switch window on record (replica going down -> production on, as the session page shows it), and
    the prediction's error for those that had a prediction."""
    bias = GaugeMetricFamily(
        "dr_portal_switch_prediction_bias_seconds",
        "Mean of measured minus predicted switch windows (above 0: the windows were longer than predicted)",
        value=figures["bias_sum"] / figures["error_n"] if figures["error_n"] else 0,
    )
    return [
        _histogram(
            "dr_portal_switch_window_seconds",
            "Switch windows: replica going down to production on",
            figures,
            "window",
            WINDOW_BUCKETS,
        ),
        _histogram(
            "dr_portal_switch_prediction_error_seconds",
            "How far the measured switch window was from the window predicted when the switch began",
            figures,
            "error",
            ERROR_BUCKETS,
        ),
        bias,
    ]


def _resumes():
    rows = (
        AuditEvent.objects.filter(action=AuditAction.RESUME)
        .order_by()
        .values_list("data__step")
        .annotate(n=Count("id"))
        .values_list("data__step", "n")
    )
    family = CounterMetricFamily(
        "dr_portal_watchdog_resumes",
        "Steps queued again by the watchdog after their worker went silent",
        labels=["step"],
    )
    for step, n in sorted(rows, key=lambda r: str(r[0])):
        family.add_metric([str(step or "")], n)
    return family


def _failed_logins():
    from axes.models import AccessAttempt

    failures = AccessAttempt.objects.aggregate(n=Sum("failures_since_start"))["n"] or 0
    return GaugeMetricFamily(
        "dr_portal_failed_logins",
        "Failed logins still counted towards a lock-out (django-axes, within the cool-off time)",
        value=failures,
    )


def _queue():
    """django-q2's queue depth and, with Redis, the clusters running now."""
    from django_q.brokers import get_broker
    from django_q.brokers.orm import ORM
    from django_q.conf import Conf
    from django_q.models import OrmQ

    from .health import live_clusters, worker_silence_s

    broker = get_broker()
    if isinstance(broker, ORM):
        # The ORM broker's own queue_size() first closes the request's database connection (it is written
        # for its long-lived broker thread), so the scrape's next query connected again: the same count here.
        depth = OrmQ.objects.using(Conf.ORM).filter(key=broker.list_key, lock__lte=timezone.now()).count()
    else:
        try:
            depth = broker.queue_size() or 0
        finally:
            if settings.REDIS_URL:
                broker.connection.close()
    yield GaugeMetricFamily("dr_portal_queue_depth", "Tasks waiting in django-q2's queue", value=depth)
    if settings.REDIS_URL:
        yield GaugeMetricFamily("dr_portal_q_clusters", "django-q2 clusters running now", value=len(live_clusters()))
    silent = worker_silence_s()
    if silent is not None:
        yield GaugeMetricFamily(
            "dr_portal_watchdog_silence_seconds",
            "Seconds since the watchdog last ran (scheduler and a worker)",
            value=silent,
        )


class PortalCollector:
    """Everything /metrics shows, read when it is scraped."""

    def collect(self):
        figures = _session_figures()
        yield _sessions(figures)
        yield from _bytes_copied(figures)
        yield from _switches(figures)
        yield _resumes()
        yield from _queue()
        yield _failed_logins()
        yield GaugeMetricFamily(
            "dr_portal_websocket_clients", "Websockets open on this web process", value=websocket_clients.value
        )


registry = CollectorRegistry(auto_describe=False)
registry.register(PortalCollector())


# -- who may scrape -----------------------------------------------------------------------------


def scrape_allowed(request):
    """The bearer token matches (compared in constant time), or the caller's address is on the allow-list."""
    token = settings.FAILBACK_METRICS_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in settings.FAILBACK_METRICS_ALLOW)


@login_not_required
@never_cache
@require_GET
def metrics(request):
    if not scrape_allowed(request):
        response = HttpResponse("Forbidden: send the metrics token, or scrape from an allowed address.\n", status=403)
        response["Content-Type"] = "text/plain; charset=utf-8"
        return response
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
