"""Presenters: what the pages, the htmx fragments and the websockets render, built in one place."""

from django.db.models import Count
from django.utils import timezone

from . import actions, workflow
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
    failures = list(sessions.filter(status=SessionStatus.FAILED).order_by("-ended_at")[:10])
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
    return {
        "session": session,
        "disks": disks,
        "events": list(session.events.order_by("-at", "-id")[:100]),
        "can_operate": can_operate(user),
        "can_override": user.has_perm(workflow.OVERRIDE_PERMISSION),
        "time_left_s": session.time_left_s(disks),
        "actions": actions.offered(session),
        "timeline": session_timeline(session),
        "schedule_form": ScheduleSwitchForm(initial={"switch_at": session.switch_at}),
        "reason_form": ReasonForm(),
        "now": timezone.now(),
        **extra,
    }


def plan_prediction(plan, members):
    """Members switch one after the other: the plan's window is the sum of theirs plus the power-on delays."""
    windows = [s.predicted_window_s for s in members if s.status == SessionStatus.READY_TO_SWITCH]
    if not windows or any(w is None for w in windows):
        return None
    return sum(windows) + plan.power_on_delay_s * (len(windows) - 1)


def plan_context(plan, user, **extra):
    members = list(plan.members())
    return {
        "plan": plan,
        "members": members,
        "summary": plan.summary(members),
        "can_operate": can_operate(user),
        "in_failback": any(s.status == SessionStatus.FAILBACK for s in members),
        "predicted": plan_prediction(plan, members),
        "schedule_form": ScheduleSwitchForm(initial={"switch_at": plan.switch_at}),
        "reason_form": ReasonForm(),
        **extra,
    }
