"""Units that say what they are: every size and rate the portal shows is binary (KiB, MiB, GiB, MiB/s) in
the tables, the event log and audit text and the chart; the bandwidth limit, typed in MB/s (10^6 bytes/s),
is shown in MiB/s beside the figure as typed; the API's schema states the MB/s unit."""

import re
import time

import pytest
from django.test import Client
from django.urls import reverse
from django.utils.text import slugify

from failback import plans
from failback.models import FailbackSession, SessionDisk
from failback.templatetags.failback_tags import (
    bandwidth_limit,
    binary_size,
    disk_rate,
    rate,
    throughput_chart,
    written_apart,
)

from .conftest import wait_for
from .helpers import network_map, replica_named, start

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DECIMAL = re.compile(r"\b\d[\d.,]*\s*(?:kB|KB|MB|GB|TB)\b")  # 1.5 GB, 200 MB, 4 KB: what filesizeformat writes
AS_TYPED = re.compile(r"\(set as \d+ MB/s\)")  # the one decimal figure shown on purpose, beside its MiB/s


def decimal_units(html):
    return DECIMAL.findall(AS_TYPED.sub("", html))


def test_it_writes_sizes_in_binary_units():
    assert [binary_size(n) for n in (0, 512, 1536, 64 * MiB, 3 * GiB, 5 * 1024 * GiB)] == [
        "0 B",
        "512 B",
        "1.5 KiB",
        "64.0 MiB",
        "3.0 GiB",
        "5.0 TiB",
    ]
    assert binary_size(None) == "—" and rate(0) == "—" and rate(50 * MiB) == "50.0 MiB/s"
    assert bandwidth_limit(None) == "none" and bandwidth_limit(3) == "2.9 MiB/s (set as 3 MB/s) on the data written"
    assert bandwidth_limit(100) == "95.4 MiB/s (set as 100 MB/s) on the data written"


def test_it_labels_the_chart_in_mib_per_second():
    svg = throughput_chart([[0, 40 * MiB, 1], [1, 60 * MiB, 1], [2, 30 * MiB, 1]])
    assert "peak 60.0 MiB/s, latest 30.0 MiB/s over 2 s" in svg and ">MiB/s</text>" in svg and ">60</text>" in svg
    assert "idle" not in svg  # data moved the whole time


def test_a_rate_under_a_limit_does_not_read_above_it():
    """1 MB/s is 0.95 MiB/s: a copy paced to it shows at most that, and the chart draws the limit; a delta,
    which reads more than it writes, shows its read rate with what it wrote beside it."""
    copy = SessionDisk(phase=1, rate_bps=1.03 * 10**6, bytes_done=50 * MiB, bytes_written=50 * MiB)
    assert disk_rate(copy, 1) == "1.0 MiB/s" and disk_rate(copy, None) == "1.0 MiB/s"
    assert rate(1.03 * 10**6) == "1.0 MiB/s" and disk_rate(copy, 1) == rate(10**6) == "1.0 MiB/s"
    fast = SessionDisk(phase=1, rate_bps=1.3 * MiB, bytes_done=50 * MiB, bytes_written=50 * MiB)
    assert disk_rate(fast, 1) == "1.0 MiB/s" and disk_rate(fast, None) == "1.3 MiB/s"
    delta = SessionDisk(phase=2, rate_bps=1.3 * MiB, bytes_done=28 * MiB, bytes_written=int(2.6 * MiB))
    assert disk_rate(delta, 1) == "1.3 MiB/s" and written_apart(delta) and not written_apart(fast)
    svg = throughput_chart([[0, 0.9 * MiB, 1], [1, 0.95 * MiB, 1]], 1)
    assert 'class="limit"' in svg and "limit 1.0 MiB/s" in svg, svg


def polylines(svg):
    return [
        [tuple(map(float, point.split(","))) for point in found.split()]
        for found in re.findall(r'<polyline points="([^"]+)"', svg)
    ]


def test_the_chart_draws_idle_time_idle():
    """Phase 1, then ten minutes Ready to switch with nothing moving, then the switch: no slope from the
    last rate of phase 1 to the first of phase 2 across the wait, but two runs with the wait at zero."""
    phase1 = [[t, 40 * MiB, 1] for t in range(0, 60)]
    switch = [[660 + t, 12 * MiB, 2] for t in range(0, 8)]
    svg = throughput_chart(phase1 + switch)
    lines = polylines(svg)
    assert len(lines) == 2 and 'class="rate phase-1"' in svg and 'class="rate phase-2"' in svg, svg
    baseline = lines[0][0][1]
    for line in lines:  # each run rises from zero and falls back to it
        assert line[0][1] == baseline and line[-1][1] == baseline, line
    end_of_phase1, start_of_switch = lines[0][-1][0], lines[1][0][0]
    gap = re.search(r'<rect x="([\d.]+)" y="10" width="([\d.]+)"[^>]*class="idle"', svg)
    assert gap and float(gap.group(1)) == end_of_phase1, svg
    assert abs(float(gap.group(1)) + float(gap.group(2)) - start_of_switch) < 0.2, svg
    assert "idle 10 min 01 s" in svg and "peak 40.0 MiB/s, latest 12.0 MiB/s" in svg


@pytest.mark.django_db
def test_it_shows_binary_units_on_every_page(lab, operator, admin_user):
    session = start(operator, replica_named("web-01"), bandwidth_mbps=3)
    disk = session.disks.order_by("key").first()
    SessionDisk.objects.filter(pk=disk.pk).update(
        capacity_bytes=3 * GiB, bytes_total=3 * GiB, bytes_done=1536 * MiB, rate_bps=50 * MiB
    )
    second = session.disks.order_by("key").last()  # a phase-2 row: what it read and the changes it sent
    SessionDisk.objects.filter(pk=second.pk).update(
        phase=2, bytes_total=28 * MiB, bytes_done=28 * MiB, bytes_written=int(2.6 * MiB), rate_bps=MiB
    )
    now = time.time()
    FailbackSession.objects.filter(pk=session.pk).update(throughput=[[now - 10, 40 * MiB, 1], [now, 60 * MiB, 1]])
    member = replica_named("app-crm")
    plan = plans.start_plan(
        operator,
        name="wave-1",
        members=[
            {
                "replica_id": member.pk,
                "vm_name": "crm-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(member),
            }
        ],
    )
    SessionDisk.objects.filter(session__plan=plan).update(bytes_total=GiB, bytes_done=512 * MiB)
    client = Client()
    client.force_login(admin_user)
    pages = {
        name: client.get(url).content.decode()
        for name, url in {
            "session": reverse("failback:session", args=[session.pk]),
            "report": reverse("failback:report", args=[session.pk]),
            "replicas": reverse("failback:replicas"),
            "dashboard": reverse("failback:dashboard"),
            "plan": reverse("failback:plan", args=[plan.pk]),
            "start": reverse("failback:start", args=[replica_named("app-erp").pk]),
        }.items()
    }
    for name, html in pages.items():
        if name == "start":  # the bandwidth field asks for MB/s and says what that is; checked below
            continue
        assert not decimal_units(html), f"{name} shows decimal units: {decimal_units(html)}"
    assert f"{disk.key} (3.0 GiB)" in pages["session"] and "1.5 GiB / 3.0 GiB" in pages["session"]
    assert "50.0 MiB/s" in pages["session"] and "peak 60.0 MiB/s" in pages["session"]
    row = re.sub(r"<[^>]+>", " ", pages["session"].split(f'id="disk-{slugify(second.key)}"')[-1].split("</tr>")[0])
    assert "28.0 MiB / 28.0 MiB" in row and "2.6 MiB written (changes sent)" in row, row  # as the log says it
    for name in ("session", "report"):
        assert "2.9 MiB/s (set as 3 MB/s) on the data written" in pages[name], name
    assert re.search(r"\d [MG]iB", pages["replicas"]) and "(512.0 MiB of 1.0 GiB)" in pages["plan"]
    assert "50.0 MiB/s" in pages["dashboard"]
    assert "1 MB/s = 10^6 bytes/s" in pages["start"]  # the form says what the unit it asks for is


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_it_writes_the_event_log_in_binary_units(lab, operator, admin_user):
    session = start(operator, replica_named("db-sql"))
    wait_for(lambda: FailbackSession.objects.get(pk=session.pk).status == "ready_to_switch", what="phase 1 to finish")
    samples = {s[1] for s in FailbackSession.objects.get(pk=session.pk).throughput}
    for disk in session.disks.all():  # each pass's last rate is on the chart, as the Rate column shows it
        assert disk.rate_bps > 0 and round(disk.rate_bps) in samples, (disk.key, disk.rate_bps, samples)
    texts = [e.detail for e in session.events.all()]
    copied = [t for t in texts if " read, " in t and " written in " in t]
    assert copied and all(re.search(r"\d MiB read, [\d.,]+ MiB written", t) for t in copied), texts
    assert not [t for t in texts if decimal_units(t)]
    client = Client()
    client.force_login(admin_user)
    for url in (reverse("failback:session", args=[session.pk]), reverse("failback:audit") + f"?session={session.pk}"):
        html = client.get(url).content.decode()
        assert "MiB" in html and not decimal_units(html), url


def test_it_states_the_bandwidth_unit_in_the_api_schema(client):
    schemas = client.get("/api/v1/schema/").json()["components"]["schemas"]
    for name in ("StartFailbackIn", "SessionOut"):
        description = schemas[name]["properties"]["bandwidth_mbps"]["description"]
        assert "megabytes per second: 1 MB/s = 10^6 bytes/s" in description and "MiB/s" in description, name
