"""The audit trail's single hook: a row worth telling is handed to the worker after its transaction commits.

Asked by ``audit.audit()`` for every row. Inside the step's transaction it only tests the row (no query) and
registers an on-commit callback; the callback queues a task and swallows the broker's errors (``robust``),
so a notification can neither roll a step back nor fail it after its commit.
"""

import logging

from django.db import transaction
from django_q.tasks import async_task

from .events import kind_of
from .routing import listening

log = logging.getLogger(__name__)


def audited(row):
    kind = kind_of(row.action, row.outcome, row.to_state, row.actor_id) if row.session_id else None
    if kind is not None:
        transaction.on_commit(lambda: _queue(row.pk, kind), robust=True)


def _queue(row_id, kind):
    """After commit: a task only when someone listens to this kind of event (no idle work for the workers)."""
    try:
        if not listening(kind):
            return
        async_task(
            "failback.notifications.tasks.notify_audit", row_id, task_name=f"notify-audit-{row_id}", group="notify"
        )
    except Exception:
        log.warning("Notification of audit row %s not queued", row_id, exc_info=True)  # never the step's failure
