"""A plan member's session page offers only what its guard allows (a browser, a real server and worker).

Before, the page showed Switch now and Schedule switch on a plan member, which the service then
refused: the page asked its own copy of the rules. Now it asks the session's guard, as the API does."""

import pytest
from django.conf import settings
from django.contrib.auth.models import User

from failback import plans
from failback.choices import SessionStatus
from failback.hypervisors.lab import LabHypervisor
from failback.models import FailbackSession

from .browser_support import browser, login, page, portal  # noqa: F401
from .conftest import wait_for
from .helpers import network_map, replica_named

pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
from playwright.sync_api import expect  # noqa: E402

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.browser]


def test_a_plan_members_page_offers_no_switch_schedule_or_cancel_of_its_own(page, portal):  # noqa: F811 (fixtures)
    replica = replica_named("web-01")
    LabHypervisor(settings.LAB_ROOT).set_vm_options(replica.vm_id, shutdown_seconds=0.2, shutdown_hangs=False)
    plan = plans.start_plan(
        User.objects.get(username="olivia"),
        name="wave G",
        members=[
            {
                "replica_id": replica.pk,
                "vm_name": f"{replica.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(replica),
            }
        ],
    )
    member = plan.sessions.get()
    wait_for(lambda: FailbackSession.objects.get(pk=member.pk).status == SessionStatus.READY_TO_SWITCH, what="phase 1")
    login(page, "olivia")
    page.goto(f"/sessions/{member.pk}/")
    actions = page.get_by_role("region", name="Actions")
    expect(page.get_by_role("link", name="wave G").first).to_be_visible()
    for name in ("Switch now", "Schedule switch", "Cancel failback"):
        expect(actions.get_by_role("button", name=name)).to_have_count(0)
    # The plan's page is where the member switches, with the others.
    page.goto(f"/plans/{plan.pk}/")
    expect(page.get_by_role("button", name="Switch now")).to_be_visible()
