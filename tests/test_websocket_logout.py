"""An open websocket follows its login: logging out closes that login's sockets, deactivating the user closes
all of theirs (before, they were only refused on the next reconnect and kept streaming meanwhile)."""

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from dr_portal.asgi import application
from failback.models import FailbackPlan, FailbackSession

from .helpers import replica_named, start
from .security_support import empty_lab, fast_password_hashing  # noqa: F401 (an autouse fixture)
from .test_websocket import own_channel_layer  # noqa: F401 (an autouse fixture)

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.asyncio, pytest.mark.security]


def logged_in(user):
    client = Client()
    client.force_login(user)
    return client


def socket(client, path):
    headers = [(b"origin", b"http://localhost"), (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())]
    return WebsocketCommunicator(application, path, headers=headers)


async def opened(client, path):
    ws = socket(client, path)
    connected, _ = await ws.connect(timeout=10)
    assert connected
    return ws


async def closed_with(ws, timeout=10):
    """The close code the server sent, after any updates that were on their way; then the client side goes too,
    so the consumer's disconnect (leaving its groups) runs in this test's event loop."""
    while True:
        message = await ws.receive_output(timeout=timeout)
        if message["type"] == "websocket.close":
            await ws.disconnect()
            return message.get("code")


@pytest.fixture
def session(db, operator):
    empty_lab()
    return start(operator, replica_named("app-crm"))


@pytest.fixture
def plan(session, operator):
    plan = FailbackPlan.objects.create(name="wave", created_by=operator)
    FailbackSession.objects.filter(pk=session.pk).update(plan=plan, plan_order=1)
    return plan


async def test_logging_out_closes_that_logins_open_sockets(session, plan, operator):
    browser, other_browser = await sync_to_async(logged_in)(operator), await sync_to_async(logged_in)(operator)
    progress = await opened(browser, f"/ws/sessions/{session.pk}/")
    dashboard = await opened(browser, "/ws/dashboard/")
    members = await opened(browser, f"/ws/plans/{plan.pk}/")
    elsewhere = await opened(other_browser, f"/ws/sessions/{session.pk}/")
    await sync_to_async(browser.post)("/accounts/logout/")
    assert [await closed_with(ws) for ws in (progress, dashboard, members)] == [4401, 4401, 4401]
    while not await elsewhere.receive_nothing(timeout=0.5):  # the other login's socket stays: drain its updates
        await elsewhere.receive_output()
    for path in ("/ws/dashboard/", f"/ws/plans/{plan.pk}/"):  # and the cookie no longer opens one
        assert not (await socket(browser, path).connect(timeout=10))[0]
    await elsewhere.disconnect()


async def test_deactivating_a_user_closes_all_their_open_sockets(session, plan, operator, viewer):
    first, second, bystander = [await sync_to_async(logged_in)(u) for u in (operator, operator, viewer)]
    sockets = [
        await opened(first, f"/ws/sessions/{session.pk}/"),
        await opened(second, "/ws/dashboard/"),
        await opened(second, f"/ws/plans/{plan.pk}/"),
    ]
    watching = await opened(bystander, "/ws/dashboard/")
    operator.is_active = False
    await sync_to_async(operator.save)()
    assert [await closed_with(ws) for ws in sockets] == [4401, 4401, 4401]
    while not await watching.receive_nothing(timeout=0.5):  # another user's socket is not touched
        await watching.receive_output()
    await watching.disconnect()
