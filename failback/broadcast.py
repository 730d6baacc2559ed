"""The one way out for live updates: a nudge to the session's group and to the group of all sessions, sent after commit.

The nudge carries no state, only the session, the group it was sent to, a unique id and its publish
time; each web process re-reads the database and renders the same fragments the pages use (see
consumers.py: a session's page, the plans it belongs to and the dashboard all follow these two groups).
So a missed nudge costs nothing: the next one, a reconnect or a reload shows the truth. Id and time go
out with the update that answers the nudge, so a client can count deliveries and measure
publish-to-receive latency (bench/ws_load.py).
"""

import hashlib
import logging
import time
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

SESSIONS_GROUP = "sessions"


def session_group(session_id):
    return f"session-{session_id}"


def send_now(session_id):
    """Publish at once (the worker's progress path, outside any transaction)."""
    layer = get_channel_layer()
    message = {"type": "session.changed", "session": session_id, "nudge": uuid.uuid4().hex, "sent": time.time()}
    try:
        async_to_sync(_publish)(layer, session_id, message)
    except Exception:  # live view is best effort; the failback must never stop for it
        log.warning("could not broadcast session %s", session_id, exc_info=True)


async def _publish(layer, session_id, message):
    # Both sends in one event loop: async_to_sync runs each call in a new loop, and the layer connects per loop.
    # Each copy names its group: a relay in both groups tells them apart (consumers.py).
    for group in (session_group(session_id), SESSIONS_GROUP):
        await layer.group_send(group, {**message, "group": group})


def session_changed(session_id):
    """Publish once the current transaction commits (immediately when there is none)."""
    transaction.on_commit(lambda: send_now(session_id))


def plan_changed(plan_id):
    """A change to a plan that changed none of its sessions' statuses (a new switch time, say): nudge each
    member once the transaction commits, so the plan's page, the members' pages and the dashboard re-render."""

    def send():
        from .models import FailbackSession

        for session_id in FailbackSession.objects.filter(plan_id=plan_id).values_list("pk", flat=True):
            send_now(session_id)

    transaction.on_commit(send)


# -- closing the sockets of a login that ended --------------------------------------------------------
# Every consumer joins its user's group and its login's group (the session cookie it authenticated with).
# Logging out closes that login's sockets; deactivating a user closes all of theirs (users with audit rows
# cannot be deleted). The
# consumers only re-check the login when a socket opens, so without this an open socket kept streaming.


def user_group(user_id):
    return f"user-{user_id}"


def login_group(session_key):
    """A group per login session, named by a digest: the session key itself never goes to the channel layer."""
    return "login-" + hashlib.sha256(session_key.encode()).hexdigest()[:32]


def close_sockets(group):
    """Close every socket in ``group`` once the current transaction commits (at once when there is none)."""

    def send():
        try:
            async_to_sync(get_channel_layer().group_send)(group, {"type": "auth.revoked"})
        except Exception:  # the next reconnect is refused anyway (the consumers check the login)
            log.warning("could not close the websockets of %s", group, exc_info=True)

    transaction.on_commit(send)
