"""What happens without a click: phase 1 ended, a scheduled switch's moment came, a commit policy's
countdown ran out. Each decides from the database whether its moment still means anything, and acts
through the workflow's own functions (audited as automatic: no actor).
"""

from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from . import approvals, plans, windows
from .audit import Refused, audit
from .choices import SCHEDULABLE, CommitPolicy, Outcome, SessionStatus, SwitchMode
from .models import FailbackPlan, FailbackSession
from .plans import OUT_OF_PLAY
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
    if session.switch_mode == SwitchMode.AUTO and windows.gated(session):
        return  # it waits for a window where the downtime fits: the readiness tick decides (switch_when_fits)
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


# -- switch when it fits: maintenance windows and a downtime budget (windows.py) ---------------------


def switch_when_fits(session_id, now=None):
    """Each readiness tick, after the fresh prediction: a session whose switch waits for a window or a budget
    switches at the first moment inside a window when the predicted downtime fits; a window that passed
    without fitting is told (why, and the next one)."""
    now = now or timezone.now()
    session = FailbackSession.objects.select_related("replica").filter(pk=session_id).first()
    if session is None or session.plan_id or not windows.gated(session):
        return None
    if session.status in STILL_COPYING:  # no switch before phase 1 ends: a window that passes is told so
        _tell_missed(session, session, now, Fit(None, None, None, None), None, copying=[session])
        windows.remember(session, checked_at=now.isoformat())
        return None
    if session.status != SessionStatus.READY_TO_SWITCH:
        return None
    data = session.prediction or {}
    fit = Fit(session.predicted_window_s, data.get("now"), data.get("convergence"), session.phase1_ended_at)
    return _decide(session, session, now, fit, lambda window, moment, facts: _switch_session(session, moment, facts))


STILL_COPYING = (SessionStatus.QUEUED, SessionStatus.PHASE1)


def copying_with_windows():
    """Failbacks still in phase 1 whose switch waits for a window: the readiness tick looks at them too, to
    tell a window that passes before they can switch."""
    return FailbackSession.objects.filter(status__in=STILL_COPYING, plan=None, switch_mode=SwitchMode.AUTO).values_list(
        "pk", flat=True
    )


def plan_switch_when_fits(plan_id, now=None):
    """The same for a plan, once every member is Ready to switch: its predicted downtime is its members' one
    after the other (windows.plan_predicted); its audit rows go on the first member, so they are told too."""
    now = now or timezone.now()
    plan = FailbackPlan.objects.filter(pk=plan_id).first()
    if plan is None or plan.switch_started_at is not None or not windows.gated(plan):
        return None
    live = [
        s for s in plan.sessions.select_related("replica").order_by("plan_order", "pk") if s.status not in OUT_OF_PLAY
    ]
    if not live:
        return None
    if any(s.status != SessionStatus.READY_TO_SWITCH for s in live):  # phase 1 still runs somewhere
        _tell_missed(plan, live[0], now, Fit(None, None, None, None), None, copying=live)
        windows.remember(plan, checked_at=now.isoformat())
        return None
    ready_at = max(s.phase1_ended_at or now for s in live)
    fit = Fit(windows.plan_predicted(plan, live), None, windows.plan_converging(live), ready_at)

    def start(window, moment, facts):
        return plans.switch_if_due(plan.pk, trigger="window", reason=moment)

    return _decide(plan, live[0], now, fit, start)


@dataclass(frozen=True)
class Fit:
    predicted: float | None  # seconds, the readiness job's latest figure
    forecast: dict | None  # its parts (prediction.predict)
    converging: dict | None  # writes outpacing the copy (windows.convergence)
    ready_at: object  # since when the switch could have started (None: not yet): a window before passed in phase 1


def _decide(owner, session, now, fit, start):
    """``owner`` (a session or a plan) carries the rules and their state; audit rows go on ``session``."""
    rules, budget = owner.switch_windows or [], owner.downtime_budget_s
    fits = windows.fits(fit.predicted, budget)
    why = None if fits else windows.why_not(fit.predicted, budget, fit.forecast, fit.converging)
    _tell_missed(owner, session, now, fit, why)
    current = windows.open_window(rules, now) if rules else None
    if rules and current is None:
        windows.remember(owner, checked_at=now.isoformat())
        return None
    key = current.key if current else "any time"
    facts = {
        "window": current.as_dict() if current else None,
        "predicted_s": fit.predicted,
        "budget_s": budget,
        "convergence": fit.converging,
    }
    if fits:
        return _start_fitting(owner, now, current, key, facts, start)
    state = owner.window_state or {}
    if state.get("waiting") != key:
        inside = f" in the maintenance window {current.label}" if current else ""
        until = f"until the window closes at {current.label.split('–')[1]}" if current else "whenever it does"
        with transaction.atomic():
            audit(
                action="window_waiting",
                outcome=Outcome.INFO,
                session=session,
                from_state=session.status,
                to_state=session.status,
                detail=f"The switch waits{inside}: {why}. It starts as soon as the downtime fits, {until}.",
                data={**facts, "why": why, **_plan_of(owner)},
            )
    _remember_why(owner, now, key, why, waiting=key)
    return None


# A switch the pre-switch checks held back inside a window is tried again after this long (each try is audited).
RETRY_BLOCKED = timedelta(minutes=10)


def _start_fitting(owner, now, current, key, facts, start):
    """Start the switch; if the checks (or an approval) hold it back, say so for the window and retry later."""
    blocked = (owner.window_state or {}).get("blocked") or {}
    if blocked.get("key") == key and now - parse_datetime(blocked["at"]) < RETRY_BLOCKED:
        windows.remember(owner, checked_at=now.isoformat())
        return None
    where = f"in the maintenance window {current.label}" if current else "now"
    budget = facts["budget_s"]
    fit_text = (
        f"predicted {windows.seconds(facts['predicted_s'])} within the budget of {budget} s"
        if budget is not None
        else "no downtime budget"
    )
    started = start(current, f"{where}: {fit_text}", facts)
    if started:
        windows.remember(owner, checked_at=now.isoformat(), met=key)
        return started
    why = "the downtime fitted, but the pre-switch checks or an approval held the switch back (see the audit trail)"
    _remember_why(owner, now, key, why, blocked={"key": key, "at": now.isoformat()})
    return None


def _remember_why(owner, now, key, why, **more):
    reasons = {**(owner.window_state or {}).get("why", {}), key: why}
    windows.remember(owner, checked_at=now.isoformat(), why=dict(list(reasons.items())[-8:]), **more)


def _plan_of(owner):
    return {"plan": owner.name, "plan_id": owner.pk} if isinstance(owner, FailbackPlan) else {}


def _tell_missed(owner, session, now, fit, why_now, copying=None):
    """Every window that closed since the last look without the switch: why (the reason seen inside it, else
    the current one; or that phase 1 had not ended, with how much it had copied: ``copying`` are the members
    still in phase 1), and which window comes next. Told once each."""
    rules, budget = owner.switch_windows or [], owner.downtime_budget_s
    state = owner.window_state or {}
    seen = [parse_datetime(v) for v in (state.get("checked_at"), state.get("since")) if v]
    after = max(seen) if seen else (fit.ready_at or now)
    missed = [o for o in windows.occurrences(rules, after, now) if after < o.end <= now and o.key != state.get("met")]
    for occurrence in missed:
        in_phase1 = fit.ready_at is None or occurrence.end <= fit.ready_at
        if in_phase1:
            why = _phase1_why(copying, fit.ready_at)
            passed = f"passed during phase 1 ({why})"
        else:
            why = (
                state.get("why", {}).get(occurrence.key)
                or why_now
                or "the portal did not look inside it (no readiness tick)"
            )
            passed = f"passed without the switch: {why}"
        coming = windows.next_window(rules, now)
        then = (
            f"Next window: {coming.label}."
            if coming
            else "No window is left: the switch waits until windows are set again, or someone switches now."
        )
        with transaction.atomic():
            audit(
                action="window_missed",
                outcome=Outcome.INFO,
                session=session,
                from_state=session.status,
                to_state=session.status,
                detail=f"Maintenance window {occurrence.label} {passed}. {then}",
                data={
                    "window": occurrence.as_dict(),
                    "why": why,
                    "during_phase1": in_phase1,
                    "predicted_s": fit.predicted,
                    "budget_s": budget,
                    "convergence": fit.converging,
                    "next": coming.as_dict() if coming else None,
                    **_plan_of(owner),
                },
            )
        windows.remember(
            owner,
            last_missed={"window": occurrence.as_dict(), "why": why, "next": coming.as_dict() if coming else None},
        )


def _phase1_why(copying, ready_at):
    """Why a window passed without a switch while phase 1 ran: how far the copy had come."""
    if ready_at is not None:  # phase 1 ended since the last look, after the window closed
        return f"the switch could not start before phase 1 ended at {timezone.localtime(ready_at):%H:%M %Z}"
    percent = FailbackPlan.summary(copying)["percent"]
    text = f"{percent} % copied; the switch cannot start before phase 1 ends"
    members = [s for s in copying if s.plan_id]
    if members:
        ready = sum(s.status == SessionStatus.READY_TO_SWITCH for s in members)
        text = f"{percent} % copied, {ready} of {len(members)} members Ready to switch; the plan switches when all are"
    return text


def _switch_session(session, moment, facts):
    if approvals.hold(session, "switch", f"Switch {moment}", trigger="window", **facts):
        return None
    try:
        return begin_switch(
            session.pk, actor=None, detail=f"Switch started {moment}", data={"trigger": "window", **facts}
        )
    except Refused:
        return None  # someone switched or cancelled at the same moment: their action won, the refusal is audited
