"""The dashboard and the plan page over websockets, fed like the session page: every nudge is answered by a
render from the database, bursts share a render, and the last state of a burst always goes out."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from dr_portal.asgi import application
from failback import broadcast, consumers, plans
from failback.choices import SessionStatus
from failback.consumers import DASHBOARD_INTERVAL_S
from failback.models import FailbackSession, SessionDisk

from .helpers import network_map, put_session_in, replica_named, start
from .test_websocket import own_channel_layer  # noqa: F401 (an autouse fixture)

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.asyncio]

QUIET_S = 3.0  # longer than the dashboard's interval between renders: nothing more is on its way


def cookie_for(user):
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def opened(path, user):
    headers = [(b"origin", b"http://localhost")]
    if user is not None:
        headers.append((b"cookie", await sync_to_async(cookie_for)(user)))
    ws = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await ws.connect(timeout=10)
    return ws, connected, code


async def updates_until_quiet(ws, quiet=QUIET_S):
    """Every update received until none arrives for ``quiet`` seconds (receive_nothing leaves the socket open)."""
    got = []
    while not await ws.receive_nothing(timeout=quiet):
        got.append((await ws.receive_from(timeout=10)).replace("\xa0", " "))
    return got


@sync_to_async
def set_status(session, status):
    put_session_in(session, status)
    broadcast.send_now(session.pk)


@sync_to_async
def set_progress(session, done, total):
    SessionDisk.objects.filter(session_id=session.pk).update(
        bytes_done=done, bytes_total=total, rate_bps=2**20, method="full"
    )
    broadcast.send_now(session.pk)


@pytest.fixture
def session(lab, operator):
    return put_session_in(start(operator, replica_named("app-crm")), SessionStatus.FAILBACK)


@pytest.fixture
def plan(lab, operator):
    members = []
    for name in ("app-crm", "web-01"):
        replica = replica_named(name)
        members.append(
            {
                "replica_id": replica.pk,
                "vm_name": f"{replica.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(replica),
            }
        )
    return plans.start_plan(operator, name="wave L", members=members, concurrency=2)


@sync_to_async
def members_of(plan):
    return list(FailbackSession.objects.filter(plan=plan).order_by("plan_order"))


# -- the dashboard ------------------------------------------------------------------------------


@pytest.mark.security
async def test_the_dashboard_socket_refuses_anonymous_users(db):
    _, connected, code = await opened("/ws/dashboard/", None)
    assert not connected and code == 4401


async def test_the_dashboard_shows_the_last_state_of_a_burst(session, viewer):
    """Regression: the dashboard sent an update only if the previous one was a second old, so the last nudge of a
    burst was dropped and a committed session stayed shown as Committing until something else changed."""
    ws, connected, _ = await opened("/ws/dashboard/", viewer)
    assert connected
    first = await ws.receive_from(timeout=10)
    assert (
        'id="dashboard-live"' in first and 'hx-swap-oob="true"' in first and "Waiting for commit or undo (1)" in first
    )
    await asyncio.sleep(1.2)  # past any interval: the next nudge is answered at once
    await set_status(session, SessionStatus.COMMITTING)
    committing = await ws.receive_from(timeout=10)
    assert "Running (1)" in committing and "Committing" in committing
    await set_status(session, SessionStatus.COMMITTED)  # within a second of the update before
    got = await updates_until_quiet(ws)
    assert got, "no update after the burst"
    assert "Running (0)" in got[-1] and "Committing" not in got[-1] and "Waiting for commit or undo (0)" in got[-1]
    await ws.disconnect()


async def test_the_dashboard_renders_a_long_burst_at_most_once_a_second_and_ends_on_its_last_state(session, viewer):
    ws, connected, _ = await opened("/ws/dashboard/", viewer)
    assert connected
    await ws.receive_from(timeout=10)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await set_status(session, SessionStatus.COMMITTING)
    for step in range(1, 11):  # 2.5 s of progress, a nudge every 0.25 s
        await set_progress(session, step * 2**20, 10 * 2**20)
        await asyncio.sleep(0.25)
    await set_status(session, SessionStatus.COMMITTED)
    got = await updates_until_quiet(ws)
    assert (
        1 <= len(got) <= (loop.time() - began) / DASHBOARD_INTERVAL_S + 1
    )  # trailing-edge: a round at most every interval
    assert "Running (0)" in got[-1] and "Committing" not in got[-1]
    await ws.disconnect()


# -- the plan page ------------------------------------------------------------------------------


@pytest.mark.security
async def test_the_plan_socket_refuses_anonymous_users_and_unknown_plans(plan, viewer):
    _, connected, code = await opened(f"/ws/plans/{plan.pk}/", None)
    assert not connected and code == 4401
    _, connected, code = await opened("/ws/plans/999999/", viewer)
    assert not connected and code == 4404


async def test_the_plan_page_follows_its_members(plan, viewer):
    first, second = await members_of(plan)
    ws, connected, _ = await opened(f"/ws/plans/{plan.pk}/", viewer)
    assert connected
    html = await ws.receive_from(timeout=10)  # the catch-up
    assert 'id="plan-members"' in html and 'hx-swap-oob="true"' in html and "2 Ready to switch" in html
    await set_progress(second, 3 * 2**20, 6 * 2**20)  # either member's nudge reaches the plan
    html = (await ws.receive_from(timeout=15)).replace("\xa0", " ")
    assert f'aria-label="#{second.pk} disk' in html and 'value="50"' in html
    await set_status(first, SessionStatus.FAILBACK)
    await set_status(second, SessionStatus.FAILBACK)
    got = await updates_until_quiet(ws, quiet=1.5)
    assert got and "2 Failback" in got[-1]
    await ws.disconnect()


async def test_a_plan_socket_ignores_sessions_outside_the_plan(plan, viewer, operator):
    outsider = await sync_to_async(lambda: start(operator, replica_named("app-erp")))()
    ws, connected, _ = await opened(f"/ws/plans/{plan.pk}/", viewer)
    assert connected
    await ws.receive_from(timeout=10)
    await set_progress(outsider, 2**20, 4 * 2**20)
    assert await ws.receive_nothing(timeout=1.5)
    await ws.disconnect()


async def test_plan_session_and_dashboard_sockets_in_one_process_each_get_their_own_page(plan, viewer):
    first, _ = await members_of(plan)
    sockets = {}
    for path in (f"/ws/plans/{plan.pk}/", f"/ws/sessions/{first.pk}/", "/ws/dashboard/"):
        ws, connected, _ = await opened(path, viewer)
        assert connected
        await ws.receive_from(timeout=10)
        sockets[path] = ws
    await asyncio.sleep(1.2)
    await set_progress(first, 2**20, 4 * 2**20)
    for path, marker in (
        (f"/ws/plans/{plan.pk}/", 'id="plan-members"'),
        (f"/ws/sessions/{first.pk}/", 'id="session-progress"'),
        ("/ws/dashboard/", 'id="dashboard-live"'),
    ):
        html = await sockets[path].receive_from(timeout=15)
        assert marker in html and html.count('hx-swap-oob="true"') >= 1, path
        assert "<!-- nudge " in html  # names the nudge it answers
    for ws in sockets.values():
        await ws.disconnect()


async def closed_with(ws, timeout=10):
    """The close code the server sent, after any updates on their way; then the client side goes too."""
    while True:
        message = await ws.receive_output(timeout=timeout)
        if message["type"] == "websocket.close":
            await ws.disconnect()
            return message.get("code")


@pytest.mark.faults
async def test_a_failing_channel_layer_closes_every_live_socket_and_a_reconnect_catches_up(plan, viewer, monkeypatch):
    first, _ = await members_of(plan)
    sockets = []
    for path in (f"/ws/plans/{plan.pk}/", f"/ws/sessions/{first.pk}/", "/ws/dashboard/"):
        ws, connected, _ = await opened(path, viewer)
        assert connected
        await ws.receive_from(timeout=10)
        sockets.append(ws)
    relay = consumers._relay()  # this event loop's, the one the sockets above joined
    real, failed = relay.layer.receive, []

    async def fails_once(channel):
        if not failed:
            failed.append(channel)
            raise ConnectionError("the channel layer went away")
        return await real(channel)

    monkeypatch.setattr(relay.layer, "receive", fails_once)
    await set_progress(first, 2**20, 4 * 2**20)  # wakes the relay's pending read; its next one fails
    assert [await closed_with(ws) for ws in sockets] == [1011, 1011, 1011]  # htmx reconnects on its own
    again, connected, _ = await opened(f"/ws/plans/{plan.pk}/", viewer)
    assert connected
    html = await again.receive_from(timeout=10)  # the catch-up shows what the layer may have lost
    assert f'aria-label="#{first.pk} disk' in html and 'value="25"' in html
    await set_progress(first, 3 * 2**20, 4 * 2**20)  # and the relay listens again
    assert 'value="75"' in await again.receive_from(timeout=15)
    await again.disconnect()
