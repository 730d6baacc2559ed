"""The start wizard offers only what applies and shows everything before anything starts (a real browser,
server and worker): production hosts only, the switch time and the minutes only for the choices that use
them (CSS, so without JavaScript too), the network map before the reason, then a review step with the
replica, target, disks and sizes, networks, switch, power-on, commit policy and the checks."""

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from failback.choices import CommitPolicy, SessionStatus, SwitchMode
from failback.models import FailbackSession, Replica
from failback.templatetags.failback_tags import binary_size

from .browser_support import browser, login, page, portal  # noqa: F401 (fixtures)

pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.browser]

CRM = "app-crm-01_replica"


def test_the_wizard_offers_what_applies_and_reviews_before_it_starts(page, portal):
    replica = Replica.objects.get(name=CRM)
    login(page, "olivia")
    page.goto(f"/replicas/{replica.pk}/failback/")
    hosts = page.locator("#id_target_host option").all_inner_texts()
    assert hosts == ["esx-prod-01", "esx-prod-02"]  # the DR site's esx-dr-01/02 run the replicas: not offered

    switch_at, minutes = page.get_by_label("Switch at"), page.get_by_label(re.compile("^Minutes in Failback"))
    expect(switch_at).to_be_hidden()  # manual switch: no time to give
    expect(minutes).to_be_hidden()  # no automatic commit or undo: no minutes
    page.get_by_label("At a scheduled time").check()
    expect(switch_at).to_be_visible()
    page.get_by_label(re.compile("Commit automatically after")).check()
    expect(minutes).to_be_visible()
    page.get_by_label(re.compile("Manually")).check()
    expect(switch_at).to_be_hidden()
    page.get_by_label("At a scheduled time").check()
    # The network map comes before the reason.
    order = page.evaluate(
        "[...document.querySelectorAll('#start-form select[id^=id_net_], #start-form #id_reason')].map(e => e.id)"
    )
    assert order[-1] == "id_reason" and len(order) == 3, order

    when = timezone.localtime() + timedelta(hours=3)
    switch_at.fill(when.strftime("%Y-%m-%dT%H:%M"))
    minutes.fill("30")
    page.get_by_label(re.compile("^Why fail back now")).fill("CHG-15 rehearsal")
    page.get_by_role("button", name="Review the failback").click()

    # Step 2: everything that will happen, and the checks; nothing has started yet.
    expect(page.get_by_role("heading", name=f"Review the failback of {CRM}")).to_be_visible()
    assert not FailbackSession.objects.exists()
    facts = page.locator("#review-form dl.facts")
    expect(facts).to_contain_text(f"{CRM} on {replica.host}")
    expect(facts).to_contain_text("app-crm-01, built new on esx-prod-01 / prod-ds-")
    expect(facts).to_contain_text(f"At a scheduled time: {when:%Y-%m-%d %H:%M}")
    expect(facts).to_contain_text("app-crm-01 is powered on after the switch")
    expect(facts).to_contain_text("Commit automatically after 30 min in Failback")
    expect(facts).to_contain_text("CHG-15 rehearsal")
    rows = page.locator("#review-disks tbody tr")
    expect(rows).to_have_count(replica.disks.count())
    for disk in replica.disks.all():  # sizes in binary units, as everywhere in the portal
        cells = rows.filter(has=page.locator("td", has_text=disk.key)).locator("td")
        expect(cells).to_have_text(
            [disk.key, binary_size(disk.capacity_bytes), disk.datastore, re.compile("^prod-ds-")]
        )
    networks = page.locator("#review-networks tbody tr")
    expect(networks.filter(has_text="dr-net").locator("td")).to_have_text(["dr-net", "prod-net"])
    expect(networks.filter(has_text="dr-dmz").locator("td")).to_have_text(["dr-dmz", "prod-dmz"])
    checks = page.get_by_role("list", name="Pre-failback checks")
    expect(checks).to_contain_text("OK")

    page.get_by_role("button", name="Change the choices").click()  # back to step 1, with the choices kept
    expect(page.locator("#id_commit_after_min")).to_have_value("30")
    expect(page.locator("#id_switch_mode_1")).to_be_checked()
    page.get_by_role("button", name="Review the failback").click()
    page.get_by_role("button", name="Start failback").click()
    page.wait_for_url(re.compile(r"/sessions/\d+/$"))
    session = FailbackSession.objects.get()
    assert (session.switch_mode, session.commit_policy, session.commit_after_min) == (
        SwitchMode.SCHEDULED,
        CommitPolicy.AUTO_COMMIT,
        30,
    )
    assert session.target_host == "esx-prod-01" and session.reason == "CHG-15 rehearsal"
    countdown = page.locator("#switch-countdown")  # the scheduled switch counts down on the session page
    expect(countdown).to_contain_text(f"{when:%Y-%m-%d %H:%M}")
    expect(countdown.get_by_role("timer")).to_have_text(re.compile(r"^in 2 h 5\d min \d\d s$"))
    assert page.dialogs == [] and page.js_errors == []
    assert session.status in (SessionStatus.QUEUED, SessionStatus.PHASE1, SessionStatus.READY_TO_SWITCH)


def test_without_javascript_the_wizard_still_hides_what_does_not_apply(browser, portal):
    replica = Replica.objects.get(name=CRM)
    context = browser.new_context(base_url=portal.url, java_script_enabled=False)
    page = context.new_page()
    try:
        login(page, "olivia")
        page.goto(f"/replicas/{replica.pk}/failback/")
        expect(page.get_by_label("Switch at")).to_be_hidden()
        page.get_by_label("At a scheduled time").check()
        expect(page.get_by_label("Switch at")).to_be_visible()
        # The server checks what the page hid: a scheduled switch without a time is refused, by the field.
        page.get_by_role("button", name="Review the failback").click()
        expect(page.locator(".field-switch_at .field-error")).to_have_text("A scheduled switch needs a date and time.")
        expect(page.get_by_label("Switch at")).to_be_visible()
        assert not FailbackSession.objects.exists()
    finally:
        context.close()
