"""The session page's timeline: every step it shows as begun also ends, whichever way the session ended;
one step per row with its duration, and the step the session is in now marked (highlighted, and
``aria-current="step"`` for screen readers), none once it ended.

Found from outside: after a cancel during phase 1 the timeline said "Phase 1 … running" next to "Ended (Cancelled)";
later, that the timeline was one run-on line.
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
    assert re.fullmatch(r"Phase 1 \d\d:\d\d:\d\d – \d\d:\d\d:\d\d \(1 min 3\d s\) cancelled", steps[1]), steps
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


def current_step(client, session):
    page = client.get(f"/sessions/{session.pk}/").content.decode()
    items = re.search(r'<ol class="timeline"[^>]*>(.*?)</ol>', page, re.S).group(1)
    marked = re.findall(r'<li class="step current" aria-current="step">(.*?)</li>', items, re.S)
    classes = re.findall(r'<li class="step (\w+)"', items)
    text = [re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", "", li))).strip() for li in marked]
    return text, classes


@pytest.mark.django_db
def test_it_marks_the_step_the_session_is_in_with_its_duration_so_far(client, operator):
    empty_lab()
    session = in_phase1(operator, replica_named("app-erp"))
    marked, classes = current_step(client, session)
    assert len(marked) == 1 and re.fullmatch(
        r"Phase 1 \d\d:\d\d:\d\d \(1 min \d\d s so far\) running", marked[0]
    ), marked
    assert classes[:3] == ["done", "current", "pending"], classes
    now = timezone.now()
    FailbackSession.objects.filter(pk=session.pk).update(phase1_ended_at=now - timedelta(seconds=30))
    put_session_in(session, SessionStatus.READY_TO_SWITCH)
    marked, classes = current_step(client, session)
    assert len(marked) == 1 and marked[0].startswith("Ready to switch ") and "so far) waiting" in marked[0], marked
    assert classes[:3] == ["done", "done", "current"], classes
    FailbackSession.objects.filter(pk=session.pk).update(
        switch_started_at=now - timedelta(seconds=20),
        replica_stop_started_at=now - timedelta(seconds=20),
        replica_off_at=now - timedelta(seconds=12),
        phase2_ended_at=now - timedelta(seconds=4),
        production_on_at=now - timedelta(seconds=1),
    )
    put_session_in(session, SessionStatus.FAILBACK)
    marked, classes = current_step(client, session)
    assert len(marked) == 1 and marked[0].startswith("Failback ") and "switch window 19 s" in marked[0], marked
    assert classes == ["done", "done", "done", "done", "done", "current", "pending"], classes
    steps = timeline(client, session)
    assert re.fullmatch(r"Stop replica \d\d:\d\d:\d\d – \d\d:\d\d:\d\d \(8 s.*\)", steps[3]), steps
    assert re.fullmatch(r"Send changes \d\d:\d\d:\d\d – \d\d:\d\d:\d\d \(8 s\)", steps[4]), steps
    FailbackSession.objects.filter(pk=session.pk).update(ended_at=now)
    marked, classes = current_step(client, put_session_in(session, SessionStatus.COMMITTED))
    assert marked == [] and classes == ["done"] * 7, classes  # ended: nothing is current any more
