"""The one place that decides what is worth telling: from audit rows, and from moments nobody clicks.

``kind_of()`` is asked through ``hook.audited()`` for every audit row written (a pure test on the row,
no query): a row that tells something, and that someone listens to, is handed to ``notify_audit`` in the
worker after the step's transaction commits. ``periodic()`` runs every minute beside the watchdog and finds the moments no audit row marks:
a session waiting for commit or undo for N minutes, a commit policy firing in N minutes, a pre-switch check
failing before a scheduled switch. Each moment has a key, so a second look at it sends nothing twice.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from ..choices import CommitPolicy, Outcome, SessionStatus, SwitchMode
from ..models import AuditEvent, FailbackSession
from .models import Notification, NotifyEvent
from .routing import listening, route

log = logging.getLogger(__name__)

# The session status a transition ends in -> what it tells.
ENDINGS = {
    SessionStatus.COMMITTED: NotifyEvent.COMMITTED,
    SessionStatus.UNDONE: NotifyEvent.UNDONE,
    SessionStatus.CANCELLED: NotifyEvent.CANCELLED,
    SessionStatus.FAILED: NotifyEvent.FAILED,
}


def kind_of(action, outcome, to_state, actor_id):
    """What an audit row tells, or None. Pure: asked inside the step's transaction for every row."""
    if outcome == Outcome.OK and to_state in ENDINGS:
        return ENDINGS[to_state]
    if action == "start_failback" and outcome == Outcome.OK:
        return NotifyEvent.STARTED
    if action == "finish_phase1" and outcome == Outcome.OK:
        return NotifyEvent.READY_TO_SWITCH
    if action == "switch" and outcome == Outcome.OK:
        return NotifyEvent.SWITCH_STARTED
    if action == "switch_window":
        return NotifyEvent.SWITCH_FINISHED
    if action == "window_missed":
        return NotifyEvent.WINDOW_MISSED  # a maintenance window passed: the downtime did not fit (windows.py)
    if action == "convergence_warning":
        return NotifyEvent.CONVERGENCE  # writes outpace the copy: catch-ups cannot shrink the delta
    if action == "request_approval":
        return NotifyEvent.APPROVAL_REQUESTED  # someone (or the portal's own moment) waits for a second person
    if action == "switch" and outcome == Outcome.REFUSED and actor_id is None:
        return NotifyEvent.PRECHECK_FAILED  # an automatic (scheduled or after phase 1) switch the checks held back
    return None


def notify_audit(row_id):
    """In the worker, after commit: the notification an audit row tells, written once and routed."""
    row = AuditEvent.objects.select_related("session__replica").filter(pk=row_id).first()
    if row is None or row.session is None:
        return None
    kind = kind_of(row.action, row.outcome, row.to_state, row.actor_id)
    if kind is None or not listening(kind):
        return None
    session = row.session
    title, text, data = describe(kind, session, row)
    return emit(f"audit-{row.pk}", kind, session, title, text, data)


def emit(key, kind, session, title, text, data):
    """Write the notification (once per key) and its deliveries, and queue them after commit."""
    if not listening(kind):
        return None
    payload = {"event": kind, "session": session_facts(session), **data}
    try:
        with transaction.atomic():
            notification = Notification.objects.create(
                key=key, event=kind, session=session, title=title, text=text, data=payload
            )
            route(notification)
    except IntegrityError:
        return None  # told already (another look at the same moment)
    return notification


def session_facts(session):
    base = settings.FAILBACK_NOTIFY_BASE_URL.rstrip("/")
    return {
        "id": session.pk,
        "replica": session.replica.name,
        "source": session.replica.source_name,
        "vm_name": session.vm_name,
        "status": session.status,
        "switch_mode": session.switch_mode,
        "switch_at": session.switch_at.isoformat() if session.switch_at else None,
        "url": f"{base}/sessions/{session.pk}/" if base else None,
    }


def _name(session):
    return f"failback #{session.pk} ({session.replica.name} → {session.vm_name})"


def _seconds(value):
    return "not predicted yet" if value is None else f"{value:.0f} s"


def describe(kind, session, row):
    """Title, text and data of an audit-derived notification."""
    label = NotifyEvent(kind).label
    data = {"audit_id": row.pk, "actor": row.actor_name, "detail": row.detail, "at": row.at.isoformat()}
    title = f"{label}: {_name(session)}"
    if kind == NotifyEvent.READY_TO_SWITCH:
        predicted = predicted_downtime(session)
        data["predicted_downtime_s"] = predicted
        title = f"Ready to switch: {_name(session)}, predicted downtime {_seconds(predicted)}"
    elif kind == NotifyEvent.SWITCH_FINISHED:
        data["window_s"] = row.data.get("seconds")
        data["predicted_s"] = row.data.get("predicted_s")
        title = f"Switch finished: {_name(session)}, window {_seconds(data['window_s'])}"
    elif kind == NotifyEvent.FAILED:
        data["reason"] = session.error or row.detail
        title = f"Failback failed: {_name(session)}"
    elif kind == NotifyEvent.SWITCH_STARTED:
        data["trigger"] = row.data.get("trigger")
    elif kind == NotifyEvent.APPROVAL_REQUESTED:
        data["request"], data["action"] = row.data.get("request"), row.data.get("action")
        data["expires_at"] = row.data.get("expires_at")
        title = f"Approval needed: {row.data.get('action', '').replace('_', ' ')} of {_name(session)} (request #{data['request']})"
    elif kind in (NotifyEvent.WINDOW_MISSED, NotifyEvent.CONVERGENCE):
        data.update(
            {
                k: row.data.get(k)
                for k in ("window", "why", "predicted_s", "budget_s", "next", "write_bps", "copy_bps", "disks")
                if k in row.data
            }
        )
        title = f"{label}: {_name(session)}"
    elif kind == NotifyEvent.PRECHECK_FAILED:
        data["checks"] = [c for c in row.data.get("checks", []) if c.get("status") == "fail"]
    elif kind in DECISIONS:
        decided = decision(session, kind)
        if decided is not None:
            data["decided_by"], data["decision"] = decided.actor_name, decided.detail
    text = f"{title}\n\n{row.detail}\n\nBy {row.actor_name} at {row.at:%Y-%m-%d %H:%M:%S %Z}."
    if data.get("decided_by"):
        text += f"\nDecided by {data['decided_by']}: {data['decision']}"
    if data.get("reason"):
        text += f"\n\nReason: {data['reason']}"
    return title, text, data


# An ending a worker writes (as system) -> the actions of the person (or policy) who decided it.
DECISIONS = {
    NotifyEvent.COMMITTED: ["commit"],
    NotifyEvent.UNDONE: ["undo"],
    NotifyEvent.CANCELLED: ["cancel", "cancel_reused", "cancel_phase1", "cancel_ready"],
}


def decision(session, kind):
    rows = AuditEvent.objects.filter(session=session, action__in=DECISIONS[kind], outcome=Outcome.OK)
    return rows.order_by("-at", "-id").first()


def predicted_downtime(session):
    """The switch window a switch now would cause: the readiness job's figure, else predicted now."""
    if session.predicted_window_s is not None:
        return round(session.predicted_window_s, 1)
    at_switch = (session.prediction or {}).get("at_switch") or {}
    if at_switch.get("window_s") is not None:
        return round(at_switch["window_s"], 1)
    if session.status != SessionStatus.READY_TO_SWITCH:
        return None
    from contextlib import closing

    from .. import prediction
    from ..hypervisors.registry import hypervisor_for

    try:
        with closing(hypervisor_for(session.replica)) as hv:
            return round(prediction.predict(hv, session)["window_s"], 1)
    except Exception:  # a notification never fails for want of a figure: it says so instead
        log.warning("No predicted downtime for failback #%s", session.pk, exc_info=True)
        return None


# -- moments nobody clicks: every minute -----------------------------------------------------------


def periodic(now=None):
    """Waiting sessions, commit policies about to fire, failing checks before a scheduled switch."""
    now = now or timezone.now()
    told = [*_waiting(now), *_policy_soon(now), *_precheck_failing(now)]
    return [n for n in told if n is not None]


def _waiting(now):
    every = timedelta(minutes=settings.FAILBACK_NOTIFY_WAITING_MINUTES)
    sessions = FailbackSession.objects.select_related("replica").filter(
        status=SessionStatus.FAILBACK, phase2_ended_at__lte=now - every
    )
    for session in sessions:
        waited = now - session.phase2_ended_at
        times = int(waited / every)  # once at N minutes, again at 2N, ...
        minutes = int(waited.total_seconds() // 60)
        title = f"Waiting for commit or undo for {minutes} min: {_name(session)}"
        text = (
            f"{title}\n\nThe workload runs on the production VM since {session.phase2_ended_at:%Y-%m-%d %H:%M:%S %Z}; "
            "the replica is off and kept until someone commits or undoes."
        )
        yield emit(f"waiting-{session.pk}-{times}", NotifyEvent.WAITING, session, title, text, {"waiting_min": minutes})


def _policy_soon(now):
    ahead = timedelta(minutes=settings.FAILBACK_NOTIFY_POLICY_MINUTES)
    sessions = FailbackSession.objects.select_related("replica").filter(
        status=SessionStatus.FAILBACK,
        policy_stopped_at=None,
        policy_due_at__gt=now,
        policy_due_at__lte=now + ahead,
    )
    for session in sessions:
        left = round((session.policy_due_at - now).total_seconds() / 60)
        verb = "commit" if session.commit_policy == CommitPolicy.AUTO_COMMIT else "undo"
        title = f"Automatic {verb} in {left} min: {_name(session)}"
        text = f"{title}\n\nIt runs at {session.policy_due_at:%Y-%m-%d %H:%M:%S %Z} unless someone acts or stops the countdown."
        data = {"policy": session.commit_policy, "due": session.policy_due_at.isoformat(), "minutes_left": left}
        yield emit(
            f"policy-{session.pk}-{session.policy_due_at.isoformat()}",
            NotifyEvent.POLICY_SOON,
            session,
            title,
            text,
            data,
        )


def _precheck_failing(now):
    """The readiness job re-runs the switch checks every minute; a failure before a scheduled switch is told
    once per switch time and set of failing checks."""
    sessions = FailbackSession.objects.select_related("replica").filter(
        status=SessionStatus.READY_TO_SWITCH, switch_mode=SwitchMode.SCHEDULED, switch_at__gt=now
    )
    for session in sessions:
        failing = [c for c in (session.prediction or {}).get("checks", []) if c.get("status") == "fail"]
        if not failing:
            continue
        keys = ",".join(sorted(c["key"] for c in failing))
        title = f"Pre-switch check failing before the switch at {session.switch_at:%Y-%m-%d %H:%M %Z}: {_name(session)}"
        lines = "\n".join(f"- {c['label']}: {c['detail']}" for c in failing)
        text = f"{title}\n\n{lines}\n\nThe scheduled switch will not start while a check fails."
        yield emit(
            f"precheck-{session.pk}-{session.switch_at.isoformat()}-{keys}",
            NotifyEvent.PRECHECK_FAILED,
            session,
            title,
            text,
            {"checks": failing},
        )
