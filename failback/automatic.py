"""What happens without a click: phase 1 ended, a scheduled switch's moment came, a commit policy's
countdown ran out. Each decides from the database whether its moment still means anything, and acts
through the workflow's own functions (audited as automatic: no actor).
"""

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from . import approvals, plans
from .audit import Refused, audit
from .choices import SCHEDULABLE, CommitPolicy, Outcome, SessionStatus, SwitchMode
from .models import FailbackSession
from .schedules import set_switch_schedule, wait_for_moment
from .workflow import begin_switch, finalise, transition


def after_phase1(session_id):
    """Phase 1 is done (or failed): switch now if the chosen moment says so; plans go on with the next member."""
    session = FailbackSession.objects.get(pk=session_id)
    if session.plan_id:
        plans.queue_next(session.plan_id)
        plans.switch_if_due(session.plan_id)
        return
    if session.status != SessionStatus.READY_TO_SWITCH:
        return
    if session.switch_mode == SwitchMode.AUTO:
        if not approvals.hold(session, "switch", "Automatic switch after phase 1", trigger="auto"):
            begin_switch(session_id, actor=None, detail="Automatic switch after phase 1", data={"trigger": "auto"})
    elif session.switch_mode == SwitchMode.SCHEDULED and session.switch_at and session.switch_at <= timezone.now():
        late = (timezone.now() - session.switch_at).total_seconds()
        if approvals.hold(session, "switch", "Scheduled switch due", trigger="scheduled"):
            return
        begin_switch(
            session_id,
            actor=None,
            detail=f"Scheduled switch (due {session.switch_at:%Y-%m-%d %H:%M:%S %Z}) started when phase 1 ended, {late:.0f} s late",
            data={"trigger": "scheduled", "due": session.switch_at.isoformat(), "late_s": late},
        )


# A scheduled switch that starts more than this after its time is audited as late (with late_s). Its task
# waits for the second itself (schedules.wait_for_moment), so more means no worker was free or running.
SCHEDULE_LATE_AFTER_S = 2


def _skipped(session, detail):
    """The scheduled switch's moment came and means nothing now: say why, once."""
    with transaction.atomic():
        audit(
            action="scheduled_switch", outcome=Outcome.INFO, session=session, from_state=session.status, detail=detail
        )


def scheduled_switch_due(session_id):
    """The django-q2 schedule fired (ahead of time): wait for the moment, then the session decides whether
    that still means anything."""
    wait_for_moment(lambda: FailbackSession.objects.filter(pk=session_id).values_list("switch_at", flat=True).first())
    session = FailbackSession.objects.filter(pk=session_id).first()
    if session is None:
        return
    now = timezone.now()
    if session.switch_mode != SwitchMode.SCHEDULED or session.status not in SCHEDULABLE:
        _skipped(
            session,
            f"Scheduled switch skipped: failback #{session.pk} is {session.get_status_display()} with switch {session.get_switch_mode_display().lower()}.",
        )
        return
    if session.switch_at and session.switch_at > now + timedelta(seconds=1):
        with transaction.atomic():
            _skipped(session, f"Scheduled switch skipped: it was moved to {session.switch_at:%Y-%m-%d %H:%M:%S %Z}.")
            set_switch_schedule(session)
        return
    if session.status != SessionStatus.READY_TO_SWITCH:
        _skipped(session, "Scheduled switch is due while phase 1 runs; it starts as soon as phase 1 ends.")
        return
    late = round((now - session.switch_at).total_seconds(), 1)  # one figure for the text and the data
    is_late = late > SCHEDULE_LATE_AFTER_S
    if approvals.hold(
        session, "switch", f"Scheduled switch due {session.switch_at:%Y-%m-%d %H:%M:%S %Z}", trigger="scheduled"
    ):
        return
    begin_switch(
        session_id,
        actor=None,
        detail=f"Scheduled switch (due {session.switch_at:%Y-%m-%d %H:%M:%S %Z}){f', {late:.0f} s late' if is_late else ''}",
        data={"trigger": "scheduled", "due": session.switch_at.isoformat(), "late_s": late, "late": is_late},
    )


def commit_policy_due(session_id):
    """The policy's moment came (scheduler, or the watchdog if the schedule was lost): act, audited as automatic."""
    session = FailbackSession.objects.filter(pk=session_id).first()
    if session is None:
        return None
    if (
        session.status != SessionStatus.FAILBACK
        or session.policy_due_at is None
        or session.policy_stopped_at is not None
        or session.policy_due_at > timezone.now() + timedelta(seconds=1)
    ):
        with transaction.atomic():
            audit(
                action="commit_policy",
                outcome=Outcome.INFO,
                session=session,
                from_state=session.status,
                detail=f"Automatic {session.get_commit_policy_display().split()[0].lower()} not run: failback #{session.pk} is {session.get_status_display()}"
                + (", countdown stopped" if session.policy_stopped_at else ""),
            )
        return None
    step = "commit" if session.commit_policy == CommitPolicy.AUTO_COMMIT else "undo"
    late = (timezone.now() - session.policy_due_at).total_seconds()
    if approvals.hold(session, step, f"Automatic {step} by the commit policy", trigger="commit_policy"):
        return None
    try:
        return transition(
            session.pk,
            step,
            detail=f"Automatic {step}: nobody acted within {session.commit_after_min} min of the switch (commit policy)"
            + (f", {late:.0f} s late" if late > 60 else ""),
            data={
                "trigger": "commit_policy",
                "policy": session.commit_policy,
                "due": session.policy_due_at.isoformat(),
                "late_s": round(late, 1),
            },
            then=finalise(step),
        )
    except Refused:
        return None  # an operator acted at the same moment: their action won, the refusal is audited
