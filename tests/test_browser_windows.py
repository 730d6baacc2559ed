"""Maintenance windows from the session page, in a real browser against a live server and worker: the dialog
takes the windows one a line and the budget, a bad line is refused with its reason, and the page then shows
the windows, the budget and the next window (live, over the session's websocket)."""

from datetime import UTC, datetime

import pytest

from failback.choices import Outcome, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession, Replica

from .browser_support import browser, login, off_loop, page, portal  # noqa: F401 (fixtures)
from .conftest import wait_for
from .helpers import start

pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.browser, pytest.mark.beyond]

CRM = "app-crm-01_replica"
LONG = 45_000  # ms: generous waits for worker steps on a busy 2-core machine (not a speed assertion)


def windows_away_from_now() -> tuple[str, str]:
    """A weekly window three days from today and a daily one starting in 1-2 hours: the page must show
    the next window, so the test must not run inside one (it once failed at 23:07 UTC with a window
    of 23:00-24:00 UTC, where the page rightly said the switch starts at the next check)."""
    now = datetime.now(UTC)
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(now.weekday() + 3) % 7]
    hour = (now.hour + 2) % 24
    return f"weekly {day} 02:00-04:00 Europe/Paris", f"daily {hour:02d}:00-{hour + 1:02d}:00 UTC"


def open_windows_dialog(page):
    page.locator("#session-actions").get_by_role("button", name="Maintenance windows", exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    return dialog


def test_an_operator_sets_windows_and_a_budget_in_the_session_page_s_dialog(page, portal):
    pk = off_loop(start, portal.users["olivia"], Replica.objects.get(name=CRM)).pk
    wait_for(lambda: FailbackSession.objects.get(pk=pk).status == SessionStatus.READY_TO_SWITCH, timeout=60)
    login(page, "olivia")
    page.goto(f"/sessions/{pk}/")

    dialog = open_windows_dialog(page)
    expect(dialog.get_by_role("heading")).to_contain_text("only in a maintenance window, when the downtime fits")
    dialog.get_by_label("Maintenance windows, one a line").fill("tonight 2-4")
    dialog.get_by_role("button", name="Set the windows").click()
    error = page.locator("#session-actions .msg.error")
    expect(error).to_contain_text("'tonight 2-4' is not a window", timeout=LONG)
    assert FailbackSession.objects.get(pk=pk).switch_windows == []

    dialog = open_windows_dialog(page)
    weekly, daily = windows_away_from_now()
    lines = f"{weekly}\n{daily}"
    dialog.get_by_label("Maintenance windows, one a line").fill(lines)
    dialog.get_by_label("Downtime budget (seconds)").fill("90")
    # What is sent is what the form holds when the button is pressed (a CI run once saved the budget alone).
    expect(dialog.get_by_label("Maintenance windows, one a line")).to_have_value(lines)
    expect(dialog.get_by_label("Downtime budget (seconds)")).to_have_value("90")
    dialog.get_by_role("button", name="Set the windows").click()
    expect(page.locator("#session-actions")).to_contain_text("the switch waits for a window", timeout=LONG)
    card = page.locator("#switch-windows")
    expect(card).to_contain_text(weekly, timeout=LONG)
    expect(card).to_contain_text("budget 90 s")
    expect(card).to_contain_text("Next window:")
    session = FailbackSession.objects.get(pk=pk)
    assert session.switch_mode == SwitchMode.AUTO and session.downtime_budget_s == 90
    assert AuditEvent.objects.filter(session_id=pk, action="set_switch_windows", outcome=Outcome.OK).count() == 1
    assert page.js_errors == []
