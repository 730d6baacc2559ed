"""Server time and SQL queries of the portal's pages on a big history, in a scratch SQLite database.

Seeds 5,000 replicas and 50,000 past failback sessions (two disks and ten audit rows each: 500,000
audit rows), then requests each page (first and a deep page) through Django's test client, in
process, and reports the median and p95 server time and the number of SQL queries. The peer measured
in the same run is the login page (a template and no database work): each page's p95 is also given as
a ratio to it.

/metrics is also timed on an hour's first scrape and with its cache emptied (it keeps the figures of the settled
history there, failback/metrics.py): those two lines are not page views and are left out of the last line.

Usage: .venv/bin/python bench/pages.py [--runs 30] [--database-url postgres://…/NAME] [--keep DIR]
Last line: p95_ms=<worst page p95> max_queries=<most SQL queries on one page>
"""

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPLICAS, SESSIONS, EVENTS_PER_SESSION = 5_000, 50_000, 10


def seed():
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.utils import timezone

    from failback.choices import Outcome, ReplicaState, SessionStatus, SwitchMode
    from failback.models import AuditEvent, FailbackSession, Replica, ReplicaDisk, SessionDisk

    call_command("seed_lab", "--count", "12", "--scale", "0.02", "--no-user", stdout=open(os.devnull, "w"))
    user = User.objects.create_user("olivia", password="x")
    user.groups.add(Group.objects.get(name="Operator"))
    rng = random.Random(7)
    states = [ReplicaState.READY] * 6 + [ReplicaState.FAILOVER] * 3 + [ReplicaState.READY_TO_SWITCH]
    Replica.objects.bulk_create(
        Replica(
            name=f"vm-{i:05d}_replica",
            source_name=f"vm-{i:05d}",
            vm_id=f"bench-{i}",
            host=f"esx-dr-{i % 40:02d}",
            site=f"DR-{i % 3}",
            state=rng.choice(states),
        )
        for i in range(REPLICAS)
    )
    replica_ids = list(Replica.objects.filter(vm_id__startswith="bench-").values_list("pk", flat=True))
    ReplicaDisk.objects.bulk_create(
        ReplicaDisk(replica_id=r, key=f"scsi0:{k}", capacity_bytes=(k + 1) * 2**30, datastore="dr-ds-01")
        for r in replica_ids
        for k in range(2)
    )
    now = timezone.now()
    outcomes = [SessionStatus.COMMITTED] * 7 + [SessionStatus.UNDONE] * 2 + [SessionStatus.FAILED]
    batch = 5_000
    for start in range(0, SESSIONS, batch):
        sessions = []
        for i in range(start, min(SESSIONS, start + batch)):
            t = now - timedelta(minutes=(SESSIONS - i) * 15)
            sessions.append(
                FailbackSession(
                    replica_id=replica_ids[i % len(replica_ids)],
                    status=rng.choice(outcomes),
                    vm_name=f"prod-{i}",
                    target_host="esx-prod-01",
                    target_datastore="prod-ds-01",
                    switch_mode=SwitchMode.MANUAL,
                    shutdown_timeout_s=900,
                    started_by=user,
                    created_at=t,
                    phase1_started_at=t,
                    phase1_ended_at=t + timedelta(minutes=5),
                    switch_started_at=t + timedelta(minutes=6),
                    replica_off_at=t + timedelta(minutes=6, seconds=20),
                    phase2_ended_at=t + timedelta(minutes=6, seconds=30),
                    production_on_at=t + timedelta(minutes=6, seconds=31),
                    ended_at=t + timedelta(minutes=10),
                )
            )
        FailbackSession.objects.bulk_create(sessions, batch_size=1000)
    session_rows = list(FailbackSession.objects.values_list("pk", "replica_id", "created_at"))
    for start in range(0, len(session_rows), batch):
        chunk = session_rows[start : start + batch]
        SessionDisk.objects.bulk_create(
            (
                SessionDisk(
                    session_id=pk,
                    key=f"scsi0:{k}",
                    capacity_bytes=2**30,
                    method="full",
                    bytes_total=2**29,
                    bytes_done=2**29,
                    verified=True,
                )
                for pk, _, _ in chunk
                for k in range(2)
            ),
            batch_size=2000,
        )
        AuditEvent.objects.bulk_create(
            (
                AuditEvent(
                    at=created + timedelta(seconds=e),
                    actor=user if e in (0, 5, 9) else None,
                    actor_name="olivia" if e in (0, 5, 9) else "system",
                    action=f"step_{e}",
                    session_id=pk,
                    replica_id=replica,
                    outcome=Outcome.OK,
                    detail=f"step {e} of session {pk}",
                    data={"n": e},
                )
                for pk, replica, created in chunk
                for e in range(EVENTS_PER_SESSION)
            ),
            batch_size=2000,
        )
    return user, session_rows[-1][0]


def measure(client, url, runs, before=None):
    """Median and p95 server time of ``runs`` requests (after two not counted), and the queries of one more;
    ``before`` runs ahead of each request, outside the time measured."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(2):
        assert client.get(url).status_code == 200, url
    times = []
    for _ in range(runs):
        if before:
            before()
        started = time.perf_counter()
        response = client.get(url)
        if hasattr(response, "streaming_content"):
            b"".join(response.streaming_content)
        times.append((time.perf_counter() - started) * 1000)
    if before:
        before()
    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    times.sort()
    return statistics.median(times), times[max(0, int(round(0.95 * len(times))) - 1)], len(queries)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--database-url",
        default="",
        help="measure on this database instead of a scratch SQLite one (the production profile: "
        "postgres://USER@HOST:PORT/NAME); its tables are emptied first, and again at the end unless --keep",
    )
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the seeded data in DIR (a var/ folder) and reuse it next time"
    )
    args = parser.parse_args()
    var = args.keep or tempfile.mkdtemp(prefix="dr-pages-")
    Path(var).mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "DR_PORTAL_VAR": var,
            "DJANGO_SETTINGS_MODULE": "dr_portal.settings",
            "LOG_LEVEL": "WARNING",
            "DJANGO_ALLOWED_HOSTS": "testserver",
            "FAILBACK_METRICS_ALLOW": "127.0.0.1",  # the test client's address: /metrics answers it
        }
    )
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    if args.database_url:
        os.environ["DATABASE_URL"] = args.database_url
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from failback.models import FailbackSession

    call_command("migrate", verbosity=0)
    call_command("migrate", database="channels", verbosity=0)
    print(f"database: {connection.vendor} {connection.settings_dict['NAME']}")
    if args.keep and FailbackSession.objects.count() >= SESSIONS:
        user, last_session = User.objects.get(username="olivia"), FailbackSession.objects.order_by("-pk")[0].pk
        print(f"reusing the seeded data in {var}")
    else:
        call_command("flush", interactive=False, verbosity=0)  # TRUNCATE on PostgreSQL: the trail allows it
        started = time.monotonic()
        user, last_session = seed()
        print(
            f"seeded {REPLICAS} replicas, {SESSIONS} sessions, {SESSIONS * EVENTS_PER_SESSION} audit rows in {time.monotonic() - started:.0f} s"
        )
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            # Statistics and the visibility map, as autovacuum keeps them on a trail that only grows
            # (counts then read the smallest index alone)
            cursor.execute("VACUUM ANALYZE")
    client = Client()
    client.force_login(user)
    anonymous = Client()
    peer_median, peer_p95, _ = measure(anonymous, "/accounts/login/", args.runs)
    print(f"{'peer: login page':38} median {peer_median:7.1f} ms  p95 {peer_p95:7.1f} ms")
    pages = [
        ("dashboard", "/"),
        ("replicas", "/replicas/"),
        ("replicas, page 100 (deep)", "/replicas/?page=100"),
        ("replicas, filtered", "/replicas/?state=failover&q=vm-04&sort=host"),
        ("sessions", "/sessions/"),
        ("sessions, page 1000 (deep)", "/sessions/?page=1000"),
        ("session page", f"/sessions/{last_session}/"),
        ("session report", f"/sessions/{last_session}/report/"),
        ("audit", "/audit/"),
        ("audit, page 5000 (deep)", "/audit/?page=5000"),
        ("audit, filtered (a user: 150,000 rows)", "/audit/?user=olivia"),
        ("audit, text search", "/audit/?q=session+4242"),
        ("audit, text search, rare", "/audit/?q=of+session+49999"),
        ("metrics (a Prometheus scrape)", "/metrics"),
    ]
    worst_p95 = max_queries = 0
    for name, url in pages:
        median, p95, queries = measure(client, url, args.runs)
        worst_p95, max_queries = max(worst_p95, p95), max(max_queries, queries)
        print(
            f"{name:38} median {median:7.1f} ms  p95 {p95:7.1f} ms  queries {queries:3d}  p95 vs peer {p95 / peer_p95:5.1f}x"
        )
    # /metrics reads the settled history from the cache (failback/metrics.py): an hour's first scrape adds the
    # sessions that settled in that hour to the previous hour's figures; a cache holding neither reads it all.
    from django.core.cache import cache
    from django.utils import timezone

    from failback import metrics

    def hours_first_scrape():
        now = timezone.now()
        metrics._session_figures(now - timedelta(seconds=metrics.SETTLED_STEP_S))  # the previous hour's, cached
        cache.delete(metrics.settled_key(metrics.settled_before(now)))

    def cache_lost():
        cache.clear()

    for name, before in (("metrics, an hour's first scrape", hours_first_scrape), ("metrics, cache lost", cache_lost)):
        median, p95, queries = measure(client, "/metrics", max(5, args.runs // 3), before)
        print(
            f"{name:38} median {median:7.1f} ms  p95 {p95:7.1f} ms  queries {queries:3d}  p95 vs peer {p95 / peer_p95:5.1f}x"
            + ("  (once an hour)" if before is hours_first_scrape else "  (once per cache emptied or process start)")
        )
    if not args.keep:
        if args.database_url:
            call_command("flush", interactive=False, verbosity=0)
        shutil.rmtree(var, ignore_errors=True)
    print(f"p95_ms={worst_p95:.0f} max_queries={max_queries}")


if __name__ == "__main__":
    main()
