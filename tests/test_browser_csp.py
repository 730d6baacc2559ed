"""The Content-Security-Policy in a real browser: Chromium logs no violation while the pages work (a form's
action dialogs from dialogs.js, htmx actions, live updates over the websocket)."""

import re

import pytest

from failback.models import FailbackSession, Replica

from .browser_support import browser, login, page, portal, wait_in_page  # noqa: F401 (fixtures)

pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.browser, pytest.mark.security]

CRM = "app-crm-01_replica"
LONG = 45_000  # ms: generous for worker steps on a busy machine (not a speed assertion)
# Every violation, also those Chromium would only report to a report-uri, goes to the console.
REPORT_VIOLATIONS = """document.addEventListener('securitypolicyviolation',
    e => console.error('CSP violation: ' + e.violatedDirective + ' blocked ' + e.blockedURI + ' at ' + e.sourceFile + ':' + e.lineNumber));"""


def test_the_pages_work_under_the_policy_and_the_browser_reports_no_violation(page, portal):
    console = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))

    def assert_no_violation():
        violations = [m for m in console if "Content Security Policy" in m or "CSP violation" in m]
        assert violations == [], violations
        assert page.js_errors == []

    page.context.add_init_script(REPORT_VIOLATIONS)
    login(page, "olivia")
    for url in (
        "/",
        "/replicas/",
        "/sessions/",
        "/plans/",
        "/audit/?until=9999-12-31",
        "/account/tokens/",
        "/api/v1/docs",
    ):
        response = page.goto(url)
        assert "script-src 'self'" in response.headers["content-security-policy"]
    assert_no_violation()

    replica = Replica.objects.get(name=CRM)
    page.goto(f"/replicas/{replica.pk}/failback/")
    assert (
        page.evaluate("htmx.config.allowEval") is False
        and page.evaluate("document.head.querySelectorAll('style').length") == 0
    )
    page.get_by_role("button", name="Review the failback").click()  # the review step, then the start
    page.get_by_role("button", name="Start failback").click()
    page.wait_for_url(re.compile(r"/sessions/\d+/$"))
    pk = int(re.search(r"/sessions/(\d+)/$", page.url).group(1))
    wait_in_page(page, "window.__ws.open >= 1")  # live updates connected under connect-src 'self'
    # Seen live; and the buttons, re-sent when the status changes, stay put while the next one is clicked.
    expect(page.locator("#session-status")).to_have_text("Ready to switch", timeout=LONG)
    page.get_by_role("button", name="Cancel failback").click()  # htmx: the dialog (dialogs.js), hx-post, swap
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("heading")).to_have_text(f"Cancel the failback of {CRM}?")
    dialog.get_by_role("button", name="Cancel the failback").click()
    expect(page.locator("#session-status")).to_have_text("Cancelled", timeout=LONG)  # the worker's end, seen live
    assert FailbackSession.objects.get(pk=pk).status == "cancelled"
    assert page.evaluate("window.__ws.messages") >= 1
    assert_no_violation()
