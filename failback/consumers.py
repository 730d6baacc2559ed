"""Websocket: authenticates, checks access, joins the session's group, and writes nothing.

Every nudge (see broadcast.py) re-reads the session and sends the page's own fragments, rendered
for this user; htmx's ws extension swaps them in by id. The action buttons are re-sent only when
the status changed, so a reason being typed is not wiped by progress updates.
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from .broadcast import SESSIONS_GROUP, session_group
from .models import FailbackSession


class SessionConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.session_id = self.scope["url_route"]["kwargs"]["pk"]
        if not await self._exists():
            await self.close(code=4404)
            return
        self.group = session_group(self.session_id)
        self.last_status = None
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.push()  # catch up at once: whatever was missed is in the database

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        pass  # mutations go over HTTP, never over the websocket

    async def session_changed(self, event):
        await self.push()

    async def push(self):
        html = await self._render()
        if html:
            await self.send(text_data=html)

    @database_sync_to_async
    def _exists(self):
        return FailbackSession.objects.filter(pk=self.session_id).exists()

    @database_sync_to_async
    def _render(self):
        from .views import session_context

        session = FailbackSession.objects.select_related("replica", "started_by").filter(pk=self.session_id).first()
        if session is None:
            return ""
        context = session_context(session, self.scope["user"], oob=True)
        parts = [render_to_string("failback/partials/session_progress.html", context)]
        if session.status != self.last_status:
            self.last_status = session.status
            parts.append(render_to_string("failback/partials/session_actions.html", context))
        return "".join(parts)


class DashboardConsumer(AsyncWebsocketConsumer):
    """The dashboard: any session's nudge re-renders it from the database (at most every THROTTLE s)."""

    THROTTLE = 1.0

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.joined = True
        self.last_sent = 0.0
        await self.channel_layer.group_add(SESSIONS_GROUP, self.channel_name)
        await self.accept()
        await self.push()

    async def disconnect(self, code):
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
        from .views import dashboard_context

        return render_to_string("failback/partials/dashboard_live.html", {**dashboard_context(), "oob": True})
