"""The one way out for live updates: a nudge to the session's group, sent after commit.

The nudge carries no state, only a unique id and its publish time; each web process re-reads the
session from the database and renders the same fragments the page uses (see consumers.py). So a
missed nudge costs nothing: the next one, a reconnect or a reload shows the truth. Id and time go out
with the update that answers the nudge, so a client can count deliveries and measure
publish-to-receive latency (bench/ws_load.py).
"""

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
    await layer.group_send(session_group(session_id), message)
    await layer.group_send(SESSIONS_GROUP, message)


def session_changed(session_id):
    """Publish once the current transaction commits (immediately when there is none)."""
    transaction.on_commit(lambda: send_now(session_id))
