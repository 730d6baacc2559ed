"""The session page's timeline: every step it shows as begun also ends, whichever way the session ended.

Found from outside: after a cancel during phase 1 the timeline said "Phase 1 … running" next to "Ended (Cancelled)".
"""

import re
from datetime import timedelta
from html import unescape

import pytest
from django.test import Client
from django.utils import timezone

from failback import workflow
from failback.choices import SessionStatus
from failback.models import FailbackSession

from .helpers import put_session_in, replica_named, start
from .security_support import empty_lab, fast_password_hashing  # noqa: F401 (an autouse fixture)


def timeline(client, session):
    page = client.get(f"/sessions/{session.pk}/").content.decode()
    items = re.search(r'<ol class="timeline"[^>]*>(.*?)</ol>', page, re.S).group(1)
    return [
        re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", "", li))).strip()
        for li in re.findall(r"<li[^>]*>(.*?)</li>", items, re.S)
    ]


@pytest.fixture
def client(db, viewer):
    client = Client()
    client.force_login(viewer)
    return client


def in_phase1(operator, replica):
    session = start(operator, replica)
    return workflow.transition(session.pk, "begin_phase1", phase1_started_at=timezone.now() - timedelta(seconds=90))


@pytest.mark.django_db
def test_a_phase1_cancelled_ends_phase1_on_the_timeline(client, operator):
    empty_lab()
    session = in_phase1(operator, replica_named("app-erp"))
    workflow.cancel(operator, session.pk, reason="wrong host")  # the worker stops at its next progress tick...
    steps = timeline(client, session)
    assert steps[1].startswith("Phase 1") and "running" not in steps[1] and "stopping (cancel asked)" in steps[1], steps
    workflow.transition(
        session.pk, "finish_cancel", detail="Cancelled: the copy stopped"
    )  # ...and records it, as jobs.py does
    session = FailbackSession.objects.get(pk=session.pk)
    steps = timeline(client, session)
    assert session.phase1_ended_at is None  # phase 1 never finished: the timeline must not wait for it
    assert "running" not in " ".join(steps), steps
    assert re.fullmatch(r"Phase 1 \d\d:\d\d:\d\d – \d\d:\d\d:\d\d \(1 min 30 s\) cancelled", steps[1]), steps
    assert (
        steps[2] == "Ready to switch —" and steps[-1].startswith("Ended ") and steps[-1].endswith("(Cancelled)")
    ), steps


@pytest.mark.django_db
def test_a_failed_phase1_and_a_cancel_while_ready_end_their_steps(client, operator):
    empty_lab()
    failed = in_phase1(operator, replica_named("app-erp"))
    workflow.transition(failed.pk, "fail_phase1", error="datastore full")
    assert timeline(client, failed)[1].endswith(" failed"), timeline(client, failed)
    ready = put_session_in(start(operator, replica_named("db-sql")), SessionStatus.READY_TO_SWITCH)
    FailbackSession.objects.filter(pk=ready.pk).update(
        phase1_started_at=timezone.now() - timedelta(minutes=5), phase1_ended_at=timezone.now() - timedelta(minutes=2)
    )
    workflow.cancel(operator, ready.pk)
    workflow.transition(ready.pk, "finish_cancel")
    steps = timeline(client, ready)
    assert "running" not in steps[1] and re.fullmatch(
        r"Ready to switch \d\d:\d\d:\d\d – \d\d:\d\d:\d\d \(.+\) cancelled", steps[2]
    ), steps
    assert steps[3:6] == ["Stop replica —", "Send changes —", "Failback —"], steps
