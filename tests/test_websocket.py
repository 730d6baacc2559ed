"""Live progress over websockets: login and origin checked, fragments rendered from the database,
and progress published by another process (as a worker does) reaching the browser's socket."""

import os
import subprocess
import sys
import textwrap

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.test import Client
from django.utils import timezone

from dr_portal.asgi import application
from failback.choices import SessionStatus
from failback.models import FailbackSession

from .conftest import ROOT, subprocess_env
from .helpers import replica_named, start

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.asyncio]


@pytest.fixture(autouse=True)
def own_channel_layer(settings):
    """On the production profile parallel test workers share one Redis, and their sessions the same small ids:
    each worker gets its own key prefix, so a nudge for another worker's session #1 never reaches this one's.
    Returns the prefix (None when there is no need), which a publishing process must use too."""
    worker, layer = os.environ.get("PYTEST_XDIST_WORKER"), settings.CHANNEL_LAYERS["default"]
    if not worker or not layer["BACKEND"].startswith("channels_redis"):
        return None
    prefix = f"asgi-{worker}"
    settings.CHANNEL_LAYERS = {"default": {**layer, "CONFIG": {**layer.get("CONFIG", {}), "prefix": prefix}}}
    return prefix


def cookie_for(user):
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def communicator(session_id, cookie=None, origin=b"http://localhost", query=""):
    headers = [(b"origin", origin)]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, f"/ws/sessions/{session_id}/{query}", headers=headers)


@pytest.fixture
def session(lab, operator):
    return start(operator, replica_named("app-crm"))


@pytest.mark.security
async def test_it_closes_anonymous_websockets(session):
    ws = communicator(session.pk)
    connected, _ = await ws.connect()
    assert not connected


@pytest.mark.security
async def test_it_closes_websockets_from_another_origin(session, operator):
    ws = communicator(session.pk, await sync(cookie_for)(operator), origin=b"http://evil.example")
    connected, _ = await ws.connect()
    assert not connected


async def test_it_closes_websockets_for_unknown_sessions(session, operator):
    ws = communicator(999999, await sync(cookie_for)(operator))
    connected, _ = await ws.connect()
    assert not connected


async def test_it_sends_the_current_state_on_connect(session, viewer):
    ws = communicator(session.pk, await sync(cookie_for)(viewer))
    connected, _ = await ws.connect()
    assert connected
    html = await ws.receive_from(timeout=10)
    assert 'id="session-progress"' in html and 'hx-swap-oob="true"' in html
    assert 'id="session-actions"' in html and ">Commit</button>" not in html  # rendered for this viewer
    await ws.disconnect()


async def test_it_does_not_redraw_the_buttons_the_page_drew_for_the_same_status(session, operator):
    """The page names what its buttons were drawn for: a socket connecting after a refusal was shown
    sends the progress only, so the refusal stays; a page drawn for an older state gets the new buttons."""
    cookie = await sync(cookie_for)(operator)
    drawn = await sync(drawn_now)(session.pk)
    same = communicator(session.pk, cookie, query=f"?drawn={drawn}")
    assert (await same.connect())[0]
    html = await same.receive_from(timeout=10)
    assert 'id="session-progress"' in html and 'id="session-actions"' not in html
    await same.disconnect()
    status = drawn.split("-")[0]
    for shown in ("ready_to_switch-0" if status != "ready_to_switch" else "switching-0", "no-such-state", ""):
        older = communicator(session.pk, cookie, query=f"?drawn={shown}")
        assert (await older.connect())[0]
        html = await older.receive_from(timeout=10)
        assert f'id="session-actions" data-status="{status}"' in html, shown
        await older.disconnect()


async def test_commit_appears_live_once_production_runs_though_the_status_stays_failback(session, operator):
    """Failback is reached before the switch's last step powers production on, and Commit is held until
    then: the page drawn in between gets the Commit button over its socket when production is on, with no
    change of status and no reload."""
    from failback import broadcast

    await sync(FailbackSession.objects.filter(pk=session.pk).update)(
        status=SessionStatus.FAILBACK, power_on_after=True, production_on_at=None
    )
    cookie = await sync(cookie_for)(operator)
    held = await sync(drawn_now)(session.pk)
    ws = communicator(session.pk, cookie, query=f"?drawn={held}")
    assert (await ws.connect())[0]
    html = await ws.receive_from(timeout=10)
    assert 'id="session-actions"' not in html  # the page already shows the held Commit
    await sync(FailbackSession.objects.filter(pk=session.pk).update)(production_on_at=timezone.now())
    await sync(broadcast.send_now)(session.pk)
    html = await ws.receive_from(timeout=15)
    assert 'id="session-actions" data-status="failback"' in html and ">Commit</button>" in html
    assert "is offered once production VM" not in html
    await ws.disconnect()


def drawn_now(pk):
    """What the session page would draw its buttons for now."""
    from failback.presenters import session_context

    session = FailbackSession.objects.select_related("replica").get(pk=pk)
    return session_context(session, AnonymousUser())["drawn"]


async def test_it_delivers_progress_published_by_another_process(session, operator, settings, own_channel_layer):
    ws = communicator(session.pk, await sync(cookie_for)(operator))
    connected, _ = await ws.connect()
    assert connected
    await ws.receive_from(timeout=10)  # the catch-up frame
    publisher = textwrap.dedent(f"""
        import django
        django.setup()
        from django.conf import settings
        if {own_channel_layer!r}:
            settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = {own_channel_layer!r}
        from failback.models import SessionDisk
        from failback import broadcast
        SessionDisk.objects.filter(session_id={session.pk}).update(bytes_done=3 * 2**20, bytes_total=6 * 2**20, rate_bps=2**20, method="full")
        broadcast.send_now({session.pk})
    """)
    env = await sync(subprocess_env)(settings)
    result = subprocess.run(
        [sys.executable, "-c", publisher], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    html = (await ws.receive_from(timeout=15)).replace("\xa0", " ")  # filesizeformat uses no-break spaces
    assert "3.0 MiB / 6.0 MiB" in html and 'value="50"' in html and "1.0 MiB/s" in html
    await ws.disconnect()


def sync(fn):
    from asgiref.sync import sync_to_async

    return sync_to_async(fn)


@pytest.mark.faults
async def test_a_websocket_idle_longer_than_the_layers_blocking_read_still_gets_the_next_update(session, operator):
    """redis-py 8's default 5 s socket timeout raced channels_redis' 5 s blocking receive and closed idle
    sockets with 1011 (production profile); the layer is configured with a longer timeout."""
    import asyncio

    from failback import broadcast
    from failback.models import SessionDisk

    ws = communicator(session.pk, await sync(cookie_for)(operator))
    connected, _ = await ws.connect()
    assert connected
    await ws.receive_from(timeout=10)  # the catch-up frame
    await asyncio.sleep(7)
    assert await ws.receive_nothing(timeout=0.1)  # still open, nothing pending
    await sync(SessionDisk.objects.filter(session_id=session.pk).update)(
        bytes_done=2**20, bytes_total=4 * 2**20, rate_bps=2**20, method="full"
    )
    await sync(broadcast.send_now)(session.pk)
    html = (await ws.receive_from(timeout=15)).replace("\xa0", " ")
    assert "1.0 MiB / 4.0 MiB" in html
    await ws.disconnect()
