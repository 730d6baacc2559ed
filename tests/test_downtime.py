"""The downtime broken down where the session page shows it: before the switch the predicted window in
its parts (guest shutdown, final delta, verification, portal work, power-on), after it the measured one
from the switch's own stamps, each with its largest part named and what would shrink it."""

import re
from datetime import timedelta
from html import unescape

import pytest
from django.test import Client
from django.utils import timezone

from failback.choices import SessionStatus
from failback.models import FailbackSession

from .helpers import put_session_in, replica_named, start
from .security_support import empty_lab, fast_password_hashing  # noqa: F401 (an autouse fixture)


def text_of(client, session, kind):
    page = client.get(f"/sessions/{session.pk}/").content.decode()
    found = re.search(rf'<div class="downtime" id="downtime-{kind}">(.*?)</div>', page, re.S)
    return found and re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", found.group(1)))).strip()


@pytest.fixture
def client(db, viewer):
    client = Client()
    client.force_login(viewer)
    return client


@pytest.mark.django_db
def test_it_breaks_the_predicted_and_the_measured_downtime_down(client, operator):
    empty_lab()
    now = timezone.now()
    session = put_session_in(start(operator, replica_named("app-erp")), SessionStatus.READY_TO_SWITCH)
    prediction = {"at": now.isoformat(), "window_s": 20.0, "shutdown_s": 3.0, "shutdown_basis": "default"}
    prediction |= {"data_s": 16.0, "data_basis": "phase 1", "delta_s": 12.5, "verify_s": 3.0, "overhead_s": 0.5}
    prediction |= {"power_on_s": 1.0, "power_on_basis": "lab", "changed_bytes": 1 << 30, "disks": []}
    FailbackSession.objects.filter(pk=session.pk).update(
        phase1_started_at=now - timedelta(minutes=3), phase1_ended_at=now, prediction={"now": prediction}
    )
    text = text_of(client, session, "predicted")
    assert text.startswith("Predicted downtime: 20.0 s"), text
    for part in ("Guest shutdown 3.0 s 15 %", "Final delta 12.5 s 62 %", "Verification 3.0 s 15 %"):
        assert part in text, (part, text)
    assert "Portal work 0.5 s" in text and "Power-on 1.0 s" in text, text
    assert "Largest part: final delta (12.5 s). What would shrink it: fewer changes to send" in text, text
    assert text_of(client, session, "measured") is None  # not switched yet

    FailbackSession.objects.filter(pk=session.pk).update(
        switch_started_at=now,
        replica_stop_started_at=now,
        replica_off_at=now + timedelta(seconds=30),
        phase2_ended_at=now + timedelta(seconds=36),
        production_on_at=now + timedelta(seconds=38),
        prediction={"at_switch": prediction, "measured": {"delta_s": 4.0, "verify_s": 1.5}},
    )
    text = text_of(client, put_session_in(session, SessionStatus.FAILBACK), "measured")
    assert text.startswith("Measured downtime: 38.0 s"), text
    assert "Guest shutdown 30.0 s 79 %" in text and "Final delta 4.0 s" in text and "Portal work 0.5 s" in text, text
    assert "Largest part: guest shutdown (30.0 s). What would shrink it: a guest that stops faster" in text, text
