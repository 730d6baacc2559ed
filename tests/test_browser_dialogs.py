"""One action at a time: each button of the session page opens a dialog that says what will happen with this
session's names and figures, asks its own reason, and acts only once confirmed (a real browser, server and
worker). Cancel and Undo are secondary and say what they keep; a scheduled switch counts down live."""

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from failback import broadcast
from failback.choices import AuditAction, Outcome, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession, Replica
from failback.templatetags.failback_tags import seconds

from .browser_support import browser, login, new_page, off_loop, page, portal, wait_in_page  # noqa: F401 (fixtures)
from .conftest import make_user, wait_for
from .helpers import start

pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.browser]

CRM = "app-crm-01_replica"  # no guest tools: the switch powers it off at once
LONG = 45_000  # ms: generous waits for worker steps on a busy 2-core machine (not a speed assertion)


def wait_status(pk, *statuses):
    return wait_for(lambda: FailbackSession.objects.get(pk=pk).status in statuses, timeout=60, what=f"{statuses}")


def open_dialog(page, button):
    """Press the session page's button; returns the dialog it opened."""
    page.locator("#session-actions").get_by_role("button", name=button, exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    return dialog


def reason_label(dialog):
    return dialog.locator("label[for=dlg_reason]").inner_text().strip()


def test_each_action_asks_in_a_dialog_of_its_own_with_its_consequence_and_reason(page, portal):
    olivia = portal.users["olivia"]
    pk = off_loop(start, olivia, Replica.objects.get(name=CRM)).pk
    wait_status(pk, SessionStatus.READY_TO_SWITCH)
    session = FailbackSession.objects.select_related("replica").get(pk=pk)
    login(page, "olivia")
    page.goto(f"/sessions/{pk}/")
    actions = page.locator("#session-actions")
    expect(actions.get_by_role("button", name="Switch now")).to_be_visible()
    # No reason box on the page itself: each dialog asks its own.
    assert page.get_by_role("textbox", name=re.compile("reason", re.I)).count() == 0
    assert "primary" in actions.get_by_role("button", name="Switch now").get_attribute("class")
    assert "secondary" in actions.get_by_role("button", name="Cancel failback").get_attribute("class")
    labels = []

    # Cancel: says what it keeps, and going back does nothing.
    dialog = open_dialog(page, "Cancel failback")
    expect(dialog.get_by_role("heading")).to_have_text(f"Cancel the failback of {CRM}?")
    expect(dialog).to_contain_text(f"The replica {CRM} is not touched: it keeps running and serving users.")
    expect(dialog).to_contain_text(f"{session.vm_name} is deleted, unless you keep it below")
    labels.append(reason_label(dialog))
    dialog.get_by_role("button", name="Keep the failback going").click()
    expect(dialog).to_be_hidden()
    assert FailbackSession.objects.get(pk=pk).status == SessionStatus.READY_TO_SWITCH

    # Schedule: the time typed beside the button is restated in the dialog.
    when = timezone.localtime() + timedelta(hours=2)
    actions.get_by_label(re.compile("Switch at")).fill(when.strftime("%Y-%m-%dT%H:%M"))
    dialog = open_dialog(page, "Schedule switch")
    shown = when.strftime("%Y-%m-%d %H:%M")
    expect(dialog.get_by_role("heading")).to_have_text(re.compile(f"Switch {CRM} over at {shown} "))
    expect(dialog).to_contain_text(f"At {shown}")
    expect(dialog).to_contain_text(f"the replica {CRM} will be shut down and {session.vm_name} takes over")
    expect(dialog).to_contain_text("Until then nothing changes: the replica keeps running")
    labels.append(reason_label(dialog))
    dialog.get_by_label(labels[-1]).fill("CHG-7 maintenance window")
    dialog.get_by_role("button", name="Schedule the switch").click()
    expect(dialog).to_be_hidden()
    expect(actions).to_contain_text(f"Switch scheduled for {shown}")
    scheduled = FailbackSession.objects.get(pk=pk)
    assert scheduled.switch_mode == SwitchMode.SCHEDULED
    assert AuditEvent.objects.filter(session_id=pk, action="schedule_switch", detail__contains="CHG-7").exists()

    # The countdown: the absolute time, and a figure that goes down by itself.
    countdown = page.locator("#switch-countdown")
    expect(countdown).to_contain_text(timezone.localtime(scheduled.switch_at).strftime("%Y-%m-%d %H:%M"))
    timer = countdown.get_by_role("timer")
    expect(timer).to_have_text(re.compile(r"^in 1 h 5\d min \d\d s$"))
    first = timer.inner_text()
    expect(timer).not_to_have_text(first, timeout=5_000)

    # Switch now: the replica, the production VM and the predicted downtime, by name and figure.
    dialog = open_dialog(page, "Switch now")
    predicted = FailbackSession.objects.get(pk=pk).predicted_window_s
    assert predicted is not None
    expect(dialog.get_by_role("heading")).to_have_text(f"Switch {CRM} over to {session.vm_name} now?")
    expect(dialog).to_contain_text(f"The replica {CRM} will be shut down now")
    expect(dialog).to_contain_text(f"predicted downtime {seconds(predicted)}")
    expect(dialog).to_contain_text(f"{session.vm_name} on esx-prod-01, which is then powered on")
    labels.append(reason_label(dialog))
    reason = dialog.get_by_label(labels[-1])
    expect(reason).to_be_focused()  # the dialog opens on its reason: type it, press Enter
    reason.fill("CHG-42 users told")
    reason.press("Enter")
    expect(page.locator("#session-status")).to_have_text("Failback", timeout=LONG)
    switch = AuditEvent.objects.get(session_id=pk, action=AuditAction.SWITCH, outcome=Outcome.OK)
    assert switch.data["reason"] == "CHG-42 users told"

    # Undo: secondary, says what is lost and what it keeps; going back keeps the failback.
    assert "secondary" in actions.get_by_role("button", name="Undo").get_attribute("class")
    dialog = open_dialog(page, "Undo")
    expect(dialog).to_contain_text("changes made on the production VM since the switch will be discarded")
    expect(dialog).to_contain_text(f"What stays: The replica {CRM} comes back as it was at the switch")
    labels.append(reason_label(dialog))
    dialog.get_by_role("button", name="Keep the failback").click()
    expect(dialog).to_be_hidden()
    assert FailbackSession.objects.get(pk=pk).status == SessionStatus.FAILBACK

    dialog = open_dialog(page, "Commit")
    expect(dialog).to_contain_text(f"{session.vm_name} becomes the production workload for good")
    labels.append(reason_label(dialog))
    dialog.get_by_role("button", name="Commit the failback").click()
    expect(page.locator("#session-status")).to_have_text("Committed", timeout=LONG)
    assert len(set(labels)) == len(labels) == 5, labels
    # The event log and the audit trail name the states as the page does, not as stored.
    expect(page.locator("ol.events")).to_contain_text("(Ready to switch → Switching)")
    expect(page.locator("ol.events")).not_to_contain_text("ready_to_switch")
    page.goto(f"/audit/?session={pk}")
    expect(page.locator("table.grid tbody")).to_contain_text("Failback → Committing")
    expect(page.locator("table.grid tbody")).not_to_contain_text("ready_to_switch")
    assert page.dialogs == [] and page.js_errors == []  # no browser confirm() any more


def test_the_buttons_follow_the_session_live_for_two_operators_and_an_answer_stays(page, browser, portal):
    """Two operators on one session page. One schedules the switch: the other sees the countdown without
    reloading, and the first keeps the answer's notice through progress updates. Failback before the
    switch has powered production on holds Commit; once production runs, Commit appears on both pages
    though the status stays Failback."""
    olivia = portal.users["olivia"]
    make_user("oscar", "Operator")
    pk = off_loop(start, olivia, Replica.objects.get(name=CRM)).pk
    wait_status(pk, SessionStatus.READY_TO_SWITCH)
    other = new_page(browser, portal.url)
    try:
        login(page, "olivia")
        login(other, "oscar")
        for p in (page, other):
            p.goto(f"/sessions/{pk}/")
            p.evaluate(
                "() => { window.wsFrames = 0; document.addEventListener('htmx:wsAfterMessage', () => window.wsFrames++); }"
            )
        when = timezone.localtime() + timedelta(hours=2)
        actions = page.locator("#session-actions")
        actions.get_by_label(re.compile("Switch at")).fill(when.strftime("%Y-%m-%dT%H:%M"))
        dialog = open_dialog(page, "Schedule switch")
        dialog.get_by_role("button", name="Schedule the switch").click()
        expect(actions).to_contain_text("Switch scheduled for")
        expect(other.locator("#switch-countdown")).to_contain_text(when.strftime("%Y-%m-%d %H:%M"), timeout=LONG)
        seen = page.evaluate("window.wsFrames")
        off_loop(broadcast.send_now, pk)  # progress only: what the buttons show has not changed
        wait_in_page(page, f"window.wsFrames > {seen}")
        expect(actions).to_contain_text("Switch scheduled for")

        FailbackSession.objects.filter(pk=pk).update(
            status=SessionStatus.FAILBACK, power_on_after=True, production_on_at=None
        )
        off_loop(broadcast.send_now, pk)
        for p in (page, other):
            expect(p.locator("#session-actions")).to_contain_text("Commit is offered once production VM", timeout=LONG)
            expect(p.locator("#session-actions").get_by_role("button", name="Commit", exact=True)).to_have_count(0)
        FailbackSession.objects.filter(pk=pk).update(production_on_at=timezone.now())
        off_loop(broadcast.send_now, pk)
        for p in (page, other):
            expect(p.locator("#session-actions").get_by_role("button", name="Commit", exact=True)).to_be_visible(
                timeout=LONG
            )
            expect(p.locator("#session-actions")).not_to_contain_text("Commit is offered once production VM")
        assert page.js_errors == [] and other.js_errors == []
    finally:
        other.context.close()


def test_without_javascript_each_dialog_is_a_page_of_its_own(browser, portal):
    olivia = portal.users["olivia"]
    pk = off_loop(start, olivia, Replica.objects.get(name=CRM)).pk
    wait_status(pk, SessionStatus.READY_TO_SWITCH)
    context = browser.new_context(base_url=portal.url, java_script_enabled=False)
    page = context.new_page()
    try:
        login(page, "olivia")
        page.goto(f"/sessions/{pk}/")
        page.get_by_role("button", name="Cancel failback").click()
        expect(page.get_by_role("heading", name=f"Cancel the failback of {CRM}?")).to_be_visible()
        page.get_by_label(re.compile("Why cancel")).fill("wrong host")
        page.get_by_role("button", name="Cancel the failback").click()
        page.wait_for_url(f"**/sessions/{pk}/")
        expect(page.get_by_role("status").first).to_contain_text("Cancel")
        wait_status(pk, SessionStatus.CANCELLED)
        assert AuditEvent.objects.filter(session_id=pk, actor_name="olivia", detail__contains="wrong host").exists()
    finally:
        context.close()
