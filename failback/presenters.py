"""Presenters: what the pages, the htmx fragments and the websockets render, built in one place."""

import hashlib

from django.db.models import Count
from django.utils import timezone

from . import actions, approvals, guest_gate, plans, windows, workflow
from .choices import REPLICA_COLOURS, RUNNING, SCHEDULABLE, ReplicaState, SessionStatus, SwitchMode
from .forms import ReasonForm, ScheduleSwitchForm
from .models import FailbackSession, Replica
from .timeline import session_timeline


def can_operate(user):
    return user.has_perm(workflow.OPERATE_PERMISSION)


def dashboard_context():
    """What the DR admin watches: states, running work, switches to come, decisions waiting, failures."""
    now = timezone.now()
    counts = dict(Replica.objects.order_by().values_list("state").annotate(n=Count("pk")))
    sessions = FailbackSession.objects.select_related("replica").prefetch_related("disks")
    running = list(sessions.filter(status__in=RUNNING).order_by("created_at")[:50])
    scheduled = list(
        sessions.filter(status__in=SCHEDULABLE, switch_mode=SwitchMode.SCHEDULED).order_by("switch_at")[:50]
    )
    waiting = list(sessions.filter(status=SessionStatus.FAILBACK).order_by("phase2_ended_at")[:50])
    ready = list(sessions.filter(status=SessionStatus.READY_TO_SWITCH).order_by("phase1_ended_at")[:50])
    # The newest ten failures picked by key first: sorting every failed session's whole row (its JSON
    # fields too) to keep ten was most of the dashboard's time on a long history.
    failed = FailbackSession.objects.filter(status=SessionStatus.FAILED).order_by("-ended_at", "-pk")
    failures = list(sessions.filter(pk__in=list(failed.values_list("pk", flat=True)[:10])).order_by("-ended_at", "-pk"))
    return {
        "states": [
            (value, label, counts.get(value, 0), REPLICA_COLOURS[value]) for value, label in ReplicaState.choices
        ],
        "running": running,
        "scheduled": scheduled,
        "waiting": waiting,
        "failures": failures,
        "now": now,
        "ready": ready,
        "ready_to_switch": sessions.filter(status=SessionStatus.READY_TO_SWITCH).count(),
    }


def session_context(session, user, **extra):
    """What the session fragments need; shared by the page, the action responses and the websocket."""
    disks = list(session.disks.all())
    offered, held = actions.offered(session), actions.held(session)  # held: allowed by status, not yet (why)
    waiting = [approvals.describe(r) for r in approvals.waiting(session)]  # four eyes: what waits
    due = actions.scheduled_switch(session)
    return {
        "session": session,
        "disks": disks,
        "events": list(session.events.order_by("-at", "-id")[:100]),
        "can_operate": can_operate(user),
        "can_override": user.has_perm(workflow.OVERRIDE_PERMISSION),
        "time_left_s": session.time_left_s(disks),
        "actions": offered,
        "held": held,
        "drawn": buttons_drawn(session.status, [a["name"] for a in offered], held, waiting, due),
        "timeline": session_timeline(session),
        "downtime": downtime_breakdown(session),
        "schedule_form": ScheduleSwitchForm(initial={"switch_at": session.switch_at}),
        "reason_form": ReasonForm(),
        "now": timezone.now(),
        "fits": windows.session_summary(session),  # maintenance windows and budget, if any (windows.py)
        "waiting": waiting,
        **extra,
    }


def buttons_drawn(status, offered, held, waiting, due):
    """A short name for what the actions section shows, the same for every user: the page sends it with its
    socket, and the socket redraws the buttons only when it changes (a new status, but also Commit offered
    once production runs with the status unchanged, a countdown stopped, a switch rescheduled, an approval
    asked or answered), never for progress alone, so a reason being typed is not wiped."""
    shown = repr((offered, held, waiting, due.isoformat() if due else ""))
    return f"{status}-{hashlib.blake2b(shown.encode(), digest_size=6).hexdigest()}"


def plan_prediction(plan, members):
    """Members switch one after the other: the plan's window is the sum of theirs plus the power-on delays."""
    return windows.plan_predicted(plan, members)


def plan_context(plan, user, **extra):
    members = list(plan.members())
    return {
        "plan": plan,
        "members": members,
        "summary": plan.summary(members),
        "can_operate": can_operate(user),
        "in_failback": any(s.status == SessionStatus.FAILBACK for s in members),
        "predicted": plan_prediction(plan, members),
        "fits": windows.plan_summary(plan, members),  # maintenance windows and budget, if any
        "waiting": [approvals.describe(r) for r in approvals.waiting_for_plan(members, plan)],
        "gate": guest_gate.waiting_on(plan, members),  # the switch waits for a member's guest
        "gate_text": plans.guest_gate_text(plan),
        "schedule_form": ScheduleSwitchForm(initial={"switch_at": plan.switch_at}),
        "reason_form": ReasonForm(),
        **extra,
    }


# What would shrink each part of the switch window, said where the part is the largest.
DOWNTIME_HINTS = {
    "shutdown": "a guest that stops faster: stop its heavy services first, or check that its tools answer "
    "(without tools the replica is powered off at once, after the guest shutdown timeout otherwise)",
    "data": "fewer changes to send: switch right after a catch-up sync, or when the replica writes least",
    "delta": "fewer changes to send: switch right after a catch-up sync, or when the replica writes least",
    "verify": "less to read back: a tracked delta verifies the changed ranges only, a digest delta the whole disk",
    "overhead": "the portal's own steps between the others (database, platform calls): a busy worker host adds here",
    "power_on": "the production host's start of the VM: not in the portal's hands; check the host is not overloaded",
}
DOWNTIME_LABELS = {
    "shutdown": "guest shutdown",
    "data": "final delta and verification",
    "delta": "final delta",
    "verify": "verification",
    "overhead": "portal work",
    "power_on": "power-on",
}


def _parts(figures):
    parts = [(key, figures.get(key)) for key in DOWNTIME_LABELS]
    parts = [(key, float(seconds)) for key, seconds in parts if seconds is not None]
    if not parts:
        return None
    total = sum(seconds for _, seconds in parts)
    key, largest = max(parts, key=lambda part: part[1])
    return {
        "parts": [
            {"key": k, "label": DOWNTIME_LABELS[k], "s": v, "share": round(100 * v / total) if total else 0}
            for k, v in parts
        ],
        "total_s": total,
        "largest": {"label": DOWNTIME_LABELS[key], "s": largest, "hint": DOWNTIME_HINTS[key]},
    }


def _measured_figures(session):
    """The switch as it went: shutdown, data (split in delta, verification and portal work when the switch
    recorded them) and power-on, from the session's stamps."""
    s = session
    if not (s.replica_off_at and s.phase2_ended_at):
        return None
    measured = (s.prediction or {}).get("measured") or {}
    data_s = (s.phase2_ended_at - s.replica_off_at).total_seconds()
    figures = {}
    if s.replica_stop_started_at:
        figures["shutdown"] = (s.replica_off_at - s.replica_stop_started_at).total_seconds()
    if measured.get("delta_s") is not None and measured.get("verify_s") is not None:
        figures["delta"], figures["verify"] = measured["delta_s"], measured["verify_s"]
        figures["overhead"] = max(0.0, data_s - measured["delta_s"] - measured["verify_s"])
    else:
        figures["data"] = data_s  # final delta and verification together: the switch did not split them
    if s.production_on_at:
        figures["power_on"] = (s.production_on_at - s.phase2_ended_at).total_seconds()
    return figures


def downtime_breakdown(session):
    """The switch window in parts, predicted (while Ready to switch) and measured (after the switch), each
    with its largest part named and what would shrink it."""
    now = (session.prediction or {}).get("now") or {}
    predicted = None
    if now:
        if "delta_s" in now:
            figures = {k: now.get(k + "_s") for k in ("shutdown", "delta", "verify", "overhead", "power_on")}
        else:  # a prediction made before the data part was split
            figures = {"shutdown": now.get("shutdown_s"), "data": now.get("data_s"), "power_on": now.get("power_on_s")}
        predicted = _parts(figures)
    measured = _measured_figures(session)
    return {"predicted": predicted, "measured": _parts(measured) if measured else None}
