"""The audit trail's single hook: a row worth telling is handed to the worker after its transaction commits.

Asked by ``audit.audit()`` for every row. Inside the step's transaction it only tests the row (no query) and
registers an on-commit callback; the callback queues a task and swallows the broker's errors (``robust``),
so a notification can neither roll a step back nor fail it after its commit.
"""

import logging

from django.db import transaction
from django_q.tasks import async_task

from .events import wanted

log = logging.getLogger(__name__)


def audited(row):
    if wanted(row):
        transaction.on_commit(lambda: _queue(row.pk), robust=True)


def _queue(row_id):
    try:
        async_task(
            "failback.notifications.tasks.notify_audit", row_id, task_name=f"notify-audit-{row_id}", group="notify"
        )
    except Exception:
        log.warning("Notification of audit row %s not queued", row_id, exc_info=True)
