"""The list pages and /metrics ask the database a fixed number of questions whatever the history holds (no
query per row, no count of the whole trail), and the unfiltered audit page's count stays exact: on PostgreSQL
it is the tally migration 0022 keeps beside the trail, not a count of it."""

import ipaddress
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from failback.audit_filters import trail_count
from failback.choices import Outcome, ReplicaState, SessionStatus
from failback.models import AuditEvent, FailbackSession, Replica, ReplicaDisk, SessionDisk

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

PAGES = [
    "/replicas/",
    "/replicas/?page=2",
    "/replicas/?state=failover&q=vm&sort=host",
    "/sessions/",
    "/sessions/?page=2",
    "/audit/",
    "/audit/?page=2",
    "/audit/?user=olivia&outcome=ok",
    "/audit/?q=session",
    "/metrics",
]


def grow(operator, n):
    """n more replicas (two disks each), n ended sessions (two disks each, some long ago) and 10 n audit rows."""
    first = Replica.objects.count()
    replicas = Replica.objects.bulk_create(
        Replica(
            name=f"vm-{first + i:05d}_replica",
            source_name=f"vm-{first + i:05d}",
            vm_id=f"g{first + i}",
            host=f"esx-dr-{i % 3}",
            site=f"DR-{i % 2}",
            state=ReplicaState.FAILOVER if i % 2 else ReplicaState.READY,
        )
        for i in range(n)
    )
    ReplicaDisk.objects.bulk_create(
        ReplicaDisk(replica=r, key=f"scsi0:{k}", capacity_bytes=2**30, datastore="dr-ds-01")
        for r in replicas
        for k in range(2)
    )
    now = timezone.now()
    sessions = FailbackSession.objects.bulk_create(
        FailbackSession(
            replica=r,
            status=SessionStatus.COMMITTED,
            vm_name=r.source_name,
            target_host="esx-prod-01",
            target_datastore="prod-ds-01",
            shutdown_timeout_s=60,
            started_by=operator,
            created_at=now - timedelta(hours=i),
            replica_off_at=now - timedelta(hours=i),
            phase2_ended_at=now - timedelta(hours=i, seconds=-30),
            ended_at=now - timedelta(hours=i, seconds=-60),
        )
        for i, r in enumerate(replicas)
    )
    SessionDisk.objects.bulk_create(
        SessionDisk(session=s, key=f"scsi0:{k}", capacity_bytes=2**30, phase1_bytes_written=2**20)
        for s in sessions
        for k in range(2)
    )
    AuditEvent.objects.bulk_create(
        AuditEvent(
            actor=operator,
            actor_name="olivia",
            action="commit",
            outcome=Outcome.OK,
            session=s,
            replica=s.replica,
            detail=f"step {e} of session {s.pk}",
            data={"n": e},
        )
        for s in sessions
        for e in range(10)
    )


def queries_per_page(client):
    counts = {}
    for url in PAGES:
        client.get(url)  # what a first request loads once per process
        cache.clear()  # /metrics reads its settled history again (this test's own in-memory cache)
        with CaptureQueriesContext(connection) as queries:
            assert client.get(url).status_code == 200, url
        counts[url] = len(queries)
    return counts


def test_it_asks_as_many_questions_with_ten_times_the_rows(lab, operator, settings):
    settings.FAILBACK_METRICS_ALLOW = [ipaddress.ip_network("127.0.0.0/8")]
    client = Client()
    client.force_login(operator)
    grow(operator, 60)  # past the first page of every list
    small = queries_per_page(client)
    grow(operator, 540)
    big = queries_per_page(client)
    assert big == small, {url: (small[url], big[url]) for url in PAGES if small[url] != big[url]}
    with CaptureQueriesContext(connection) as queries:
        client.get("/audit/")
    assert not [q for q in queries if "count(" in q["sql"].lower() and "failback_auditevent" in q["sql"]] or (
        connection.vendor == "sqlite"  # SQLite counts its trail: cheap there
    )


def test_the_trails_count_is_exact_through_inserts_rollbacks_and_a_flush(operator):
    def add(n):
        AuditEvent.objects.bulk_create(
            AuditEvent(actor_name="olivia", action="commit", outcome=Outcome.OK, detail=str(i)) for i in range(n)
        )

    assert trail_count() == AuditEvent.objects.count() == 0
    add(1)
    add(250)  # one statement, many rows
    for _ in range(300):  # one statement each: the tally folds its rows every 100th statement
        add(1)
    assert trail_count() == AuditEvent.objects.count() == 551
    try:
        with transaction.atomic():
            add(5)
            assert trail_count() == 556  # the transaction sees its own rows counted
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert trail_count() == AuditEvent.objects.count() == 551
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM failback_audit_tally")
            assert cursor.fetchone()[0] <= 100  # folded at least every 100th statement, not one row per statement
            cursor.execute("TRUNCATE failback_auditevent CASCADE")  # what Django's flush does
    else:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM failback_auditevent")  # SQLite's flush
    assert trail_count() == AuditEvent.objects.count() == 0
    add(3)
    assert trail_count() == 3


def test_the_unfiltered_audit_page_shows_the_exact_count_and_reads_its_last_page_right(operator):
    client = Client()
    client.force_login(operator)  # audited: the trail's first row
    AuditEvent.objects.bulk_create(
        AuditEvent(
            at=timezone.now() - timedelta(days=1, seconds=i),
            actor_name="olivia",
            action="commit",
            outcome=Outcome.OK,
            detail=f"row {i}",
        )
        for i in range(249)
    )
    assert AuditEvent.objects.count() == 250
    page = client.get("/audit/").content.decode()
    assert "250 events" in page and "Page 1 of 3" in page and ">row 0<" in page
    last = client.get("/audit/?page=3").content.decode()  # read from the other end, with the count
    assert ">row 248<" in last and ">row 199<" in last and ">row 198<" not in last
    refused = client.get("/audit/?session=x").content.decode()  # a refused filter filters nothing out
    assert "250 events" in refused and "Session #" in refused


def test_a_filtered_audit_page_counts_up_to_its_limit_and_says_when_more_match(lab, operator, settings):
    """Past FAILBACK_AUDIT_COUNT_LIMIT matches the page counts no further (each page as fast as a short list):
    it says more match, shows the newest, and the export still holds every match. Under it, the exact count."""
    client = Client()
    client.force_login(operator)
    grow(operator, 30)  # 300 rows by olivia
    newest = AuditEvent.objects.filter(actor_name="olivia").order_by("-at", "-id").values_list("pk", flat=True)
    total = newest.count()  # the 300 and the operator's own login
    assert total > 300
    settings.FAILBACK_AUDIT_COUNT_LIMIT = 200
    page = client.get("/audit/?user=olivia")
    assert "More than 200 events match: the pages show the newest 200" in page.text
    assert [e.pk for e in page.context["page"].object_list] == list(newest[:100])
    second = client.get("/audit/?user=olivia&page=2").context["page"]
    assert second.number == 2 and not second.has_next() and [e.pk for e in second.object_list] == list(newest[100:200])
    exported = client.get("/audit/export.csv?user=olivia")
    assert b"".join(exported.streaming_content).count(b"\n") == total + 1  # every match, and the header
    settings.FAILBACK_AUDIT_COUNT_LIMIT = 1000
    page = client.get("/audit/?user=olivia")
    assert f"{total} events ·" in " ".join(page.text.split()) and "More than" not in page.text
    everything = client.get("/audit/")  # the unfiltered trail: always the exact count
    assert f"{AuditEvent.objects.count()} events" in everything.text
