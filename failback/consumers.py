"""Websockets: authenticate, check access, watch a topic (a session, the dashboard, a plan), write nothing.

Every nudge (see broadcast.py) re-reads the database and sends the page's own fragments; htmx's ws
extension swaps them in by id. Each update ends with one HTML comment per nudge it answers, naming the
nudge and its publish time: htmx ignores them, a load test (bench/ws_load.py) counts them.

One relay per web process (event loop) receives the nudges of the topics watched here, once: its own
channel joins the topics' groups (a session's group for its page and for the plans it is a member
of, the group of all sessions for the dashboard). A topic's fragment is the same for every user: the
relay renders it once per round and hands it to every consumer watching it. A round takes every
request that has arrived and only then reads the database, so it shows all the nudges announced;
nudges that come faster than the process renders share the next round instead of queueing, and the
last one is never dropped. A topic can ask for a pause between its renders (the dashboard, which any
session's progress changes): its nudges then wait, trailing-edge, for the next round after the pause,
and a new watcher's catch-up render never waits. Per-consumer group membership cost each process,
per watcher and nudge, one channel message, one trip through the database thread (channels closes old
connections before every handler) and one render: 200 watchers of 20 copying sessions fell tens of
seconds behind (bench/ws_load.py). A missed nudge still costs nothing: the next one, or a reconnect,
renders the database as it is.
"""

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.contrib.auth.models import AnonymousUser
from django.db import connection
from django.template.loader import render_to_string

from .broadcast import SESSIONS_GROUP, login_group, session_group, user_group
from .models import FailbackPlan, FailbackSession

log = logging.getLogger(__name__)

DASHBOARD_INTERVAL_S = 1.0  # the dashboard renders at most this often; the last state of a burst still goes out


# -- topics: what a page watches, which groups announce its changes, how its shared fragment renders ------
# Render functions run on the database thread and return what every watcher gets, or None once it is gone.
# They render for nobody in particular, so a shared copy can never carry one user's rights to another.


@dataclass(frozen=True)
class Topic:
    key: str  # one relay entry per key: "session-7", "dashboard", "plan-3"
    groups: tuple  # the channel-layer groups whose nudges concern it
    render: Callable = field(compare=False)
    interval: float = 0.0  # seconds between two renders of its nudges (0: every round)


def _render_session(session_id):
    """(what the action buttons show, ``presenters.buttons_drawn``; the progress fragment)."""
    from .presenters import session_context

    session = FailbackSession.objects.select_related("replica").filter(pk=session_id).first()
    if session is None:
        return None
    context = session_context(session, AnonymousUser(), oob=True)
    return context["drawn"], render_to_string("failback/partials/session_progress.html", context)


def _render_dashboard():
    from .presenters import dashboard_context

    return render_to_string("failback/partials/dashboard_live.html", {**dashboard_context(), "oob": True})


def _render_plan(plan_id):
    from .presenters import plan_context

    plan = FailbackPlan.objects.filter(pk=plan_id).first()
    if plan is None:
        return None
    return render_to_string("failback/partials/plan_members.html", plan_context(plan, AnonymousUser(), oob=True))


def session_topic(session_id):
    return Topic(f"session-{session_id}", (session_group(session_id),), partial(_render_session, session_id))


def dashboard_topic():
    return Topic("dashboard", (SESSIONS_GROUP,), _render_dashboard, DASHBOARD_INTERVAL_S)


def plan_topic(plan_id, member_ids):
    """A plan changes with its members (fixed when the plan starts): their sessions' groups announce it."""
    return Topic(f"plan-{plan_id}", tuple(session_group(m) for m in sorted(member_ids)), partial(_render_plan, plan_id))


class _Relay:
    """This process's (event loop's) subscription to the nudges of the topics watched here."""

    def __init__(self):
        self.layer = get_channel_layer()
        self.channel = None
        self.receiver = None
        self.topics = {}  # key -> Topic watched here
        self.watchers = {}  # key -> consumers here
        self.subscribers = {}  # group -> keys of the topics it announces
        self.membership = asyncio.Lock()  # group_add and group_discard, in order
        self.waiting = {}  # key -> [(nudge or None, consumer or None)] for a coming round
        self.rendered_at = {}  # key -> loop time of its last round
        self.wake = asyncio.Event()  # a request arrived while the rounds waited out an interval
        self.rounds = None  # the task running rounds while requests wait
        self.deliveries = set()

    async def watch(self, consumer):
        topic = consumer.topic
        async with self.membership:
            if self.channel is None:
                self.channel = await self.layer.new_channel()
            known = self.topics.get(topic.key)
            if known is not None:  # a plan watched since before all its members existed learns of the later ones
                topic = replace(known, groups=tuple(sorted(set(known.groups) | set(topic.groups))))
            self.topics[topic.key] = topic
            # Every join refreshes the memberships, which the channel layer expires after a day.
            for group in topic.groups:
                await self.layer.group_add(group, self.channel)
                self.subscribers.setdefault(group, set()).add(topic.key)
            self.watchers.setdefault(topic.key, set()).add(consumer)
            if self.receiver is None:
                self.receiver = asyncio.ensure_future(self.receive())
        self.request(topic.key, None, consumer)  # catch up: whatever was missed is in the database

    async def unwatch(self, consumer):
        key = consumer.topic.key
        async with self.membership:
            watchers = self.watchers.get(key, set())
            if consumer not in watchers:
                return
            watchers.discard(consumer)
            if not watchers:
                del self.watchers[key]
                self.rendered_at.pop(key, None)
                for group in self.topics.pop(key).groups:
                    keys = self.subscribers.get(group, set())
                    keys.discard(key)
                    if not keys:
                        self.subscribers.pop(group, None)
                        await self.layer.group_discard(group, self.channel)
            if not self.watchers and self.receiver is not None:  # nobody left: let go of the layer
                self.receiver.cancel()
                self.receiver = None

    async def receive(self):
        try:
            while True:
                event = await self.layer.receive(self.channel)
                # Joined to several groups, the channel gets a copy from each: a copy goes to that group's topics.
                for key in self.subscribers.get(event.get("group"), ()):
                    self.request(key, event, None)
        except asyncio.CancelledError:
            raise
        except Exception:  # the layer failed: let every client reconnect, and so catch up
            log.warning("live updates: receiving from the channel layer failed", exc_info=True)
            self.receiver = None
            for consumers in list(self.watchers.values()):
                for consumer in list(consumers):
                    await consumer.close(code=1011)

    def request(self, key, nudge, consumer):
        """Ask a coming round for a render: for everyone watching (a nudge) or one consumer (its catch-up)."""
        self.waiting.setdefault(key, []).append((nudge, consumer))
        self.wake.set()
        if self.rounds is None or self.rounds.done():
            self.rounds = asyncio.ensure_future(self.run_rounds())

    def due_at(self, key, requests):
        """When the topic's next round may run: at once for a catch-up, else once its interval has passed."""
        topic = self.topics.get(key)
        if topic is None or not topic.interval or any(consumer is not None for _, consumer in requests):
            return 0.0
        return self.rendered_at.get(key, float("-inf")) + topic.interval

    async def run_rounds(self):
        """One round after another while requests wait; each takes what waited for its due topics when it began, before any read."""
        loop = asyncio.get_running_loop()
        while self.waiting:
            self.wake.clear()
            now = loop.time()
            due_at = {key: self.due_at(key, requests) for key, requests in self.waiting.items()}
            due = [key for key, at in due_at.items() if at <= now]
            if not due:  # only paced topics wait: sleep until the first is due, or a new request comes
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), min(due_at.values()) - now)
                continue
            taken = {key: self.waiting.pop(key) for key in due}
            topics = [self.topics[key] for key in taken if key in self.topics]  # a topic left unwatched renders no more
            for topic in topics:
                self.rendered_at[topic.key] = now
            try:
                rendered = await sync_to_async(self.render)(topics)
            except Exception:  # a missed update costs nothing: the next nudge renders again
                log.warning("live updates: rendering failed", exc_info=True)
                continue
            sends = []
            for key, requests in taken.items():
                if key not in rendered:
                    continue
                nudges = [nudge for nudge, consumer in requests if consumer is None]
                for consumer in self.watchers.get(key, ()):
                    if nudges or any(c is consumer for _, c in requests):
                        sends.append(consumer.deliver(rendered[key], nudges))
            # Not awaited: the next round renders meanwhile; each consumer sends its updates in order.
            delivery = asyncio.ensure_future(_gather_logged(sends))
            self.deliveries.add(delivery)  # the loop keeps only weak references to tasks
            delivery.add_done_callback(self.deliveries.discard)

    def render(self, topics):
        """On the database thread, which keeps its connection while rounds follow one another: at ten
        rounds a second, opening a PostgreSQL connection for each cost more than the renders."""
        try:
            rendered = {topic.key: topic.render() for topic in topics}
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


class LiveConsumer(LoginBoundConsumer):
    """A page's live socket: refuses anonymous users (4401) and unknown objects (4404), watches its topic
    through the relay, and sends each round's fragment, in the order the rounds rendered them."""

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.topic = await self.find_topic()
        if self.topic is None:
            await self.close(code=4404)
            return
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

    async def find_topic(self):
        raise NotImplementedError

    async def deliver(self, rendered, nudges):
        """Send the round's fragment (and whatever this user's copy adds) and the nudges answered."""
        if rendered is None:  # gone
            return
        async with self.sending:
            parts = await self.parts(rendered)
            parts += [f"<!-- nudge {n['nudge']} sent {float(n['sent']):.6f} -->" for n in nudges if "nudge" in n]
            await self.send(text_data="".join(parts))

    async def parts(self, rendered):
        return [rendered]


class SessionConsumer(LiveConsumer):
    """The session page. The action buttons depend on the user's role: they are rendered for each user, and
    re-sent only when what they show changed (``presenters.buttons_drawn``: the status, the actions offered or
    held, a scheduled time, approvals waiting), so a reason being typed is not wiped by progress updates. The
    page says what its buttons were drawn for (``?drawn=``): a socket that connects after the page showed a
    refusal or a notice does not redraw the same buttons over it."""

    last_drawn = None

    async def find_topic(self):
        self.session_id = self.scope["url_route"]["kwargs"]["pk"]
        self.last_drawn = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get("drawn", [""])[0][:64]
        return session_topic(self.session_id) if await self._exists() else None

    async def parts(self, rendered):
        drawn, html = rendered
        parts = [html]
        if drawn != self.last_drawn:
            self.last_drawn = drawn
            parts.append(await self._render_actions())
        return parts

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
        return render_to_string(
            "failback/partials/session_actions.html", session_context(session, self.scope["user"], oob=True)
        )


class DashboardConsumer(LiveConsumer):
    """The dashboard: any session's nudge re-renders it, at most every DASHBOARD_INTERVAL_S, the last state always."""

    async def find_topic(self):
        return dashboard_topic()


class PlanConsumer(LiveConsumer):
    """A plan's page: its members' nudges re-render the members' table."""

    async def find_topic(self):
        plan_id = self.scope["url_route"]["kwargs"]["pk"]
        members = await self._members(plan_id)
        return None if members is None else plan_topic(plan_id, members)

    @database_sync_to_async
    def _members(self, plan_id):
        if not FailbackPlan.objects.filter(pk=plan_id).exists():
            return None
        return list(FailbackSession.objects.filter(plan_id=plan_id).values_list("pk", flat=True))
