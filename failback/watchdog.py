"""The watchdog: every step whose worker went silent is queued again, once, however many watchdogs look.

Steps are written to resume: phase 1 from its checkpoints, phase 2 from where it stopped (a replica
already off stays off; the delta is sent again), commit, undo and cancel from the top.
"""

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import automatic, broadcast
from .audit import audit
from .choices import STEP_OF, Outcome, SessionStatus
from .models import FailbackSession
from .schedules import enqueue


def recover_stalled():
    """Queue again every step whose worker stopped showing signs of life (killed, machine lost).

    The heartbeat is claimed with a compare-and-swap, so two watchdogs (or two web processes) resume a
    session once. Steps are written to resume: phase 1 continues from its checkpoints, phase 2 from
    where it stopped (a replica already off stays off; the delta is sent again)."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.FAILBACK_STALL_SECONDS)
    resumed = []
    for session in FailbackSession.objects.filter(status__in=list(STEP_OF), heartbeat_at__lt=cutoff):
        silent = (now - session.heartbeat_at).total_seconds()
        if _resume(
            session,
            now,
            STEP_OF[session.status],
            data={"silent_s": round(silent, 1)},
            resume=True,
            detail=f"No sign of life from the worker for {silent:.0f} s while {session.get_status_display().lower()}: "
            "the step is queued again and resumes where it stopped",
        ):
            resumed.append(session.pk)
    # Queued, but no worker ever took phase 1 (its task was lost with a killed worker: the Redis broker
    # does not hand it out again). Plan members not yet let in by their plan have no enqueued_at.
    waiting = FailbackSession.objects.filter(status=SessionStatus.QUEUED, enqueued_at__lt=cutoff).filter(
        Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=cutoff)
    )
    for session in waiting:
        waited = (now - (session.heartbeat_at or session.enqueued_at)).total_seconds()
        if _resume(
            session,
            now,
            "phase1",
            data={"silent_s": round(waited, 1)},
            detail=f"Phase 1 was queued {waited:.0f} s ago and no worker has taken it: queued again",
        ):
            resumed.append(session.pk)
    # Switched, but the worker died before powering production on: both VMs would stay off. Power it on.
    dark = FailbackSession.objects.filter(
        status=SessionStatus.FAILBACK,
        power_on_after=True,
        production_on_at=None,
        heartbeat_at__lt=cutoff,
        phase2_ended_at__isnull=False,
    )
    for session in dark:
        if _resume(
            session,
            now,
            "power_on",
            detail="The switch finished but the production VM was never powered on (the worker stopped): powering it on now",
        ):
            resumed.append(session.pk)
    # A commit policy whose schedule was lost (deleted, or the scheduler down at its time) still runs once.
    overdue = FailbackSession.objects.filter(
        status=SessionStatus.FAILBACK, policy_due_at__lt=now - timedelta(seconds=90), policy_stopped_at=None
    )
    for session_id in overdue.values_list("pk", flat=True):
        automatic.commit_policy_due(session_id)
    return resumed


def _resume(session, now, step, *, detail, data=None, **task_kwargs):
    """Claim a silent session by compare-and-swap on its heartbeat and queue its step: once, however many
    watchdogs look at the same moment. False when another claimed it first."""
    same = Q(heartbeat_at__isnull=True) if session.heartbeat_at is None else Q(heartbeat_at=session.heartbeat_at)
    with transaction.atomic():
        if FailbackSession.objects.filter(same, pk=session.pk, status=session.status).update(heartbeat_at=now) != 1:
            return False
        audit(
            action="resume",
            outcome=Outcome.INFO,
            session=session,
            from_state=session.status,
            to_state=session.status,
            detail=detail,
            data={**(data or {}), "step": step},
        )
        enqueue(step, session.pk, **task_kwargs)
        broadcast.session_changed(session.pk)
    return True
