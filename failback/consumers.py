"""Websocket: authenticates, checks access, watches the session, and writes nothing.

Every nudge (see broadcast.py) re-reads the session and sends the page's own fragments; htmx's ws
extension swaps them in by id. The action buttons depend on the user's role: they are rendered for
each user, and re-sent only when the status changed, so a reason being typed is not wiped by progress
updates. Each update ends with one HTML comment per nudge it answers, naming the nudge and its publish
time: htmx ignores them, a load test (bench/ws_load.py) counts them.

One relay per web process receives the nudges of the sessions watched here, once (its own channel
joins the session's group), renders the progress fragment, which is the same for every user, once
per round, and hands it to every consumer watching that session. A round takes every nudge that has
arrived and only then reads the database, so it shows all they announced; nudges that come faster
than the process renders share the next round instead of queueing. Per-consumer group membership
cost each process, per watcher and nudge, one channel message, one trip through the database thread
(channels closes old connections before every handler) and one render: 200 watchers of 20 copying
sessions fell tens of seconds behind (bench/ws_load.py). A missed nudge still costs nothing: the
next one, or a reconnect, renders the database as it is.
"""

import asyncio
import logging
import weakref

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.contrib.auth.models import AnonymousUser
from django.db import connection
from django.template.loader import render_to_string

from .broadcast import SESSIONS_GROUP, login_group, session_group, user_group
from .models import FailbackSession

log = logging.getLogger(__name__)


def _render_progress(session_id):
    """(status, progress fragment) as anyone sees it, or None once the session is gone."""
    from .presenters import session_context

    session = FailbackSession.objects.select_related("replica").filter(pk=session_id).first()
    if session is None:
        return None
    # Rendered for nobody in particular, so a shared copy can never carry one user's rights to another.
    context = session_context(session, AnonymousUser(), oob=True)
    return session.status, render_to_string("failback/partials/session_progress.html", context)


class _Relay:
    """This process's (event loop's) subscription to the nudges of the sessions watched here."""

    def __init__(self):
        self.layer = get_channel_layer()
        self.channel = None
        self.receiver = None
        self.watchers = {}  # session id -> consumers here
        self.membership = asyncio.Lock()  # group_add and group_discard, in order
        self.waiting = {}  # session id -> [(nudge or None, consumer or None)] for the next round
        self.rounds = None  # the task running rounds while requests wait
        self.deliveries = set()

    async def watch(self, consumer):
        async with self.membership:
            if self.channel is None:
                self.channel = await self.layer.new_channel()
            # Every join refreshes the membership, which the channel layer expires after a day.
            await self.layer.group_add(session_group(consumer.session_id), self.channel)
            self.watchers.setdefault(consumer.session_id, set()).add(consumer)
            if self.receiver is None:
                self.receiver = asyncio.ensure_future(self.receive())
        self.request(consumer.session_id, None, consumer)  # catch up: whatever was missed is in the database

    async def unwatch(self, consumer):
        async with self.membership:
            watchers = self.watchers.get(consumer.session_id, set())
            if consumer not in watchers:
                return
            watchers.discard(consumer)
            if not watchers:
                del self.watchers[consumer.session_id]
                await self.layer.group_discard(session_group(consumer.session_id), self.channel)
            if not self.watchers and self.receiver is not None:  # nobody left: let go of the layer
                self.receiver.cancel()
                self.receiver = None

    async def receive(self):
        try:
            while True:
                event = await self.layer.receive(self.channel)
                if event.get("type") == "session.changed" and event.get("session") in self.watchers:
                    self.request(event["session"], event, None)
        except asyncio.CancelledError:
            raise
        except Exception:  # the layer failed: let every client reconnect, and so catch up
            log.warning("live updates: receiving from the channel layer failed", exc_info=True)
            self.receiver = None
            for consumers in list(self.watchers.values()):
                for consumer in list(consumers):
                    await consumer.close(code=1011)

    def request(self, session_id, nudge, consumer):
        """Ask the next round for a render: for everyone watching (a nudge) or one consumer (its catch-up)."""
        self.waiting.setdefault(session_id, []).append((nudge, consumer))
        if self.rounds is None or self.rounds.done():
            self.rounds = asyncio.ensure_future(self.run_rounds())

    async def run_rounds(self):
        """One round after another while requests wait; each takes what waited when it began, before any read."""
        while self.waiting:
            waiting, self.waiting = self.waiting, {}
            try:
                rendered = await sync_to_async(self.render)(list(waiting))
            except Exception:  # a missed update costs nothing: the next nudge renders again
                log.warning("live updates: rendering failed", exc_info=True)
                continue
            sends = []
            for session_id, requests in waiting.items():
                nudges = [nudge for nudge, consumer in requests if consumer is None]
                for consumer in self.watchers.get(session_id, ()):
                    if nudges or any(c is consumer for _, c in requests):
                        sends.append(consumer.deliver(rendered[session_id], nudges))
            # Not awaited: the next round renders meanwhile; each consumer sends its updates in order.
            delivery = asyncio.ensure_future(_gather_logged(sends))
            self.deliveries.add(delivery)  # the loop keeps only weak references to tasks
            delivery.add_done_callback(self.deliveries.discard)

    def render(self, session_ids):
        """On the database thread, which keeps its connection while rounds follow one another: at ten
        rounds a second, opening a PostgreSQL connection for each cost more than the renders."""
        try:
            rendered = {session_id: _render_progress(session_id) for session_id in session_ids}
        except Exception:
            connection.close()
            raise
        if not self.waiting:  # idle next: hold no connection (read across threads: at worst one reconnect)
            connection.close()
        return rendered


async def _gather_logged(sends):
    for failed in await asyncio.gather(*sends, return_exceptions=True):
        if isinstance(failed, Exception):
            log.warning("live updates: sending failed", exc_info=failed)


_relays = weakref.WeakKeyDictionary()  # event loop -> its relay


def _relay():
    loop = asyncio.get_running_loop()
    if loop not in _relays:
        _relays[loop] = _Relay()
    return _relays[loop]


class LoginBoundConsumer(AsyncWebsocketConsumer):
    """A socket that lives only as long as the login that opened it: it joins its user's group and its
    login's (see broadcast.close_sockets), and closes with 4401 when told the login ended."""

    async def join_login_groups(self):
        session = self.scope.get("session")
        self.login_groups = [user_group(self.scope["user"].pk)]
        if session is not None and session.session_key:
            self.login_groups.append(login_group(session.session_key))
        for group in self.login_groups:
            await self.channel_layer.group_add(group, self.channel_name)

    async def leave_login_groups(self):
        for group in getattr(self, "login_groups", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def auth_revoked(self, event):
        await self.close(code=4401)


class SessionConsumer(LoginBoundConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.session_id = self.scope["url_route"]["kwargs"]["pk"]
        if not await self._exists():
            await self.close(code=4404)
            return
        self.last_status = None
        self.sending = asyncio.Lock()  # one update at a time, in the order the rounds rendered them
        await self.join_login_groups()
        await self.accept()
        self.relay = _relay()
        await self.relay.watch(self)

    async def disconnect(self, code):
        await self.leave_login_groups()
        if hasattr(self, "relay"):
            await self.relay.unwatch(self)

    async def receive(self, text_data=None, bytes_data=None):
        pass  # mutations go over HTTP, never over the websocket

    async def deliver(self, progress, nudges):
        """Send the round's progress fragment, the action buttons if the status changed, and the nudges answered."""
        if progress is None:  # the session is gone
            return
        status, html = progress
        async with self.sending:
            parts = [html]
            if status != self.last_status:
                self.last_status = status
                parts.append(await self._render_actions())
            parts += [f"<!-- nudge {n['nudge']} sent {float(n['sent']):.6f} -->" for n in nudges if "nudge" in n]
            await self.send(text_data="".join(parts))

    @database_sync_to_async
    def _exists(self):
        return FailbackSession.objects.filter(pk=self.session_id).exists()

    @database_sync_to_async
    def _render_actions(self):
        """The action buttons, for this user."""
        from .presenters import session_context

        session = FailbackSession.objects.select_related("replica", "started_by").filter(pk=self.session_id).first()
        if session is None:
            return ""
        return render_to_string("failback/partials/session_actions.html", session_context(session, self.scope["user"], oob=True))


class DashboardConsumer(LoginBoundConsumer):
    """The dashboard: any session's nudge re-renders it from the database (at most every THROTTLE s)."""

    THROTTLE = 1.0

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.joined = True
        self.last_sent = 0.0
        await self.join_login_groups()
        await self.channel_layer.group_add(SESSIONS_GROUP, self.channel_name)
        await self.accept()
        await self.push()

    async def disconnect(self, code):
        await self.leave_login_groups()
        if getattr(self, "joined", False):
            await self.channel_layer.group_discard(SESSIONS_GROUP, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        pass

    async def session_changed(self, event):
        import time

        if time.monotonic() - self.last_sent >= self.THROTTLE:
            await self.push()

    async def push(self):
        import time

        self.last_sent = time.monotonic()
        await self.send(text_data=await self._render())

    @database_sync_to_async
    def _render(self):
        from .presenters import dashboard_context

        return render_to_string("failback/partials/dashboard_live.html", {**dashboard_context(), "oob": True})
