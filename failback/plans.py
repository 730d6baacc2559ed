"""Failback plans: a named, ordered group of replicas failed back together (service layer).

Phase 1 of the members runs in plan order, at most ``concurrency`` at once. The plan has one switch
moment (auto: when every member is Ready to switch; scheduled; manual), switches all members at once,
and runs their phase 2 in order, powering production VMs on one after the other with a delay between
them. Members that failed in phase 1 are left out (their replicas keep running). Commit and undo
apply to every member in Failback, or to single members from their own session page.
"""

import time
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django_q.tasks import async_task

from . import approvals, broadcast, guest_gate, windows, workflow
from .audit import Refused, actor_name, audit, clean_reason, refuse, require_operator
from .choices import Approvable, GuestGate, Outcome, SessionStatus, SwitchMode
from .hooks import choose as choose_hooks
from .models import FailbackPlan, FailbackSession, Replica
from .schedules import drop_plan_schedule, enqueue, set_plan_schedule, validate_switch_time, wait_for_moment

ACTION_START = "start_plan"
OUT_OF_PLAY = (SessionStatus.FAILED, SessionStatus.CANCELLED)


def _approved(plan):
    """Four eyes: the approver's name for the plan's audit row, when an approved request runs it."""
    approved = approvals.running_for_plan(plan)
    return {} if approved is None else {"approved_by": actor_name(approved.decided_by), "approval_request": approved.pk}


def _audit(action, actor, plan, detail, outcome=Outcome.OK, **data):
    data = {**data, **_approved(plan)}
    with transaction.atomic():
        audit(
            action=action,
            outcome=outcome,
            actor=actor,
            detail=detail,
            data={"plan": plan.name, "plan_id": plan.pk, **data},
        )


def _refuse(message, action, actor, plan=None, **data):
    refuse(
        message,
        action=action,
        actor=actor,
        data={"plan": getattr(plan, "name", None), "plan_id": getattr(plan, "pk", None), **data},
    )


ONE_PLATFORM = "A plan's replicas must be on one platform (the lab or one vCenter): its members switch together."


def mixed_platforms(replicas):
    """The refusal's message when the replicas are not all on one platform (one vCenter), else None."""
    return ONE_PLATFORM if len({(r.platform, r.connection_id) for r in replicas}) > 1 else None


def start_plan(
    actor,
    *,
    name,
    members,
    concurrency=2,
    switch_mode=SwitchMode.MANUAL,
    switch_at=None,
    power_on_after=True,
    power_on_delay_s=0,
    guest_gate=GuestGate.NONE,
    guest_gate_address="",
    guest_gate_timeout_s=300,
    hooks=None,
    reason="",
):
    """members: [{"replica_id", "vm_name", "target_host", "target_datastore", "network_map"}] in boot order;
    guest_gate: what each waits for before the next powers on (guest_gate.py); hooks: {point: [names]} for all."""
    require_operator(actor, ACTION_START)
    reason = clean_reason(reason, action=ACTION_START, actor=actor)
    name = (name or "").strip()
    _check_plan(actor, name, members, concurrency, power_on_delay_s, switch_mode)
    gate_and_hooks = _gate_and_hooks(actor, guest_gate, guest_gate_address, guest_gate_timeout_s, power_on_after, hooks)
    if switch_mode == SwitchMode.SCHEDULED:
        validate_switch_time(switch_at, action=ACTION_START, actor=actor)
    else:
        switch_at = None
    settings = {
        "concurrency": concurrency,
        "switch_mode": switch_mode,
        "switch_at": switch_at,
        "power_on_after": power_on_after,
        "power_on_delay_s": power_on_delay_s,
        **gate_and_hooks,
    }
    with transaction.atomic():
        plan = FailbackPlan.objects.create(name=name, created_by=actor, reason=reason, **settings)
        audit(
            action=ACTION_START,
            actor=actor,
            detail=f"Plan {name}: {len(members)} replica(s), phase 1 {concurrency} at a time, "
            f"switch {SwitchMode(switch_mode).label.lower()}, power-on delay {power_on_delay_s} s"
            + (f", gate before the next member: {guest_gate_text(plan)}" if guest_gate else "")
            + (f", hooks for every member: {_hooks_text(hooks)}" if hooks else "")
            + (f"; reason: {reason}" if reason else ""),
            data={
                "plan": name,
                "plan_id": plan.pk,
                "members": members,
                **settings,
                "switch_at": switch_at.isoformat() if switch_at else None,
                "reason": reason,
            },
        )
    _start_members(actor, plan, members, reason)
    if switch_mode == SwitchMode.SCHEDULED:
        set_plan_schedule(plan)
    queue_next(plan.pk)
    return plan


def _check_plan(actor, name, members, concurrency, power_on_delay_s, switch_mode):
    if not 1 <= len(name) <= 100:
        _refuse("Name the plan (1-100 characters).", ACTION_START, actor)
    if FailbackPlan.objects.filter(name=name).exists():
        _refuse(f"A plan named {name!r} already exists; pick another name.", ACTION_START, actor)
    if not members:
        _refuse("Pick at least one replica for the plan.", ACTION_START, actor)
    if len({m["replica_id"] for m in members}) != len(members):
        _refuse("A replica appears twice in the plan.", ACTION_START, actor)
    if mixed := mixed_platforms(Replica.objects.filter(pk__in=[m["replica_id"] for m in members])):
        _refuse(mixed, ACTION_START, actor)
    if not 1 <= int(concurrency) <= 20:
        _refuse("Phase 1 concurrency must be between 1 and 20.", ACTION_START, actor)
    if not 0 <= int(power_on_delay_s) <= 3600:
        _refuse("The delay between power-ons must be between 0 and 3600 s.", ACTION_START, actor)
    if switch_mode not in SwitchMode.values:
        _refuse(f"Unknown switch mode {switch_mode!r}.", ACTION_START, actor)


def _gate_and_hooks(actor, gate, address, timeout_s, power_on_after, hooks):
    """The plan's guest-ready gate and hooks for every member, checked (else refused with the reason)."""
    address = (address or "").strip()
    _check_gate(actor, gate, address, timeout_s, power_on_after)
    if hooks:
        try:
            hooks = choose_hooks("", hooks)
        except ValueError as exc:
            _refuse(f"Plan hooks: {exc}.", ACTION_START, actor)
    return {
        "guest_gate": gate,
        "guest_gate_address": address if gate == GuestGate.TCP else "",
        "guest_gate_timeout_s": timeout_s,
        "hooks": hooks or {},
    }


def _check_gate(actor, gate, address, timeout_s, power_on_after):
    if gate not in GuestGate.values:
        _refuse(f"Unknown guest-ready gate {gate!r}.", ACTION_START, actor)
    if not gate:
        return
    if not power_on_after:
        _refuse("A guest-ready gate needs the production VMs powered on after the switch.", ACTION_START, actor)
    if not 1 <= int(timeout_s) <= guest_gate.MAX_TIMEOUT_S:
        _refuse(
            f"The guest-ready gate's timeout must be between 1 and {guest_gate.MAX_TIMEOUT_S} s.", ACTION_START, actor
        )
    if gate == GuestGate.TCP:
        try:
            guest_gate.parse_address(address)
        except ValueError as exc:
            _refuse(f"The guest-ready gate's TCP address: {exc}.", ACTION_START, actor)


def guest_gate_text(plan):
    if not plan.guest_gate:
        return "none"
    return f"{guest_gate.describe(plan)}, at most {plan.guest_gate_timeout_s} s, else the rest of the plan stops"


def _hooks_text(hooks):
    return "; ".join(f"{point}: {', '.join(names)}" for point, names in hooks.items() if names) or "none"


def _start_members(actor, plan, members, reason):
    """Every member's failback, or none: a refused member withdraws those already accepted."""
    started = []
    try:
        for order, m in enumerate(members, 1):
            options = workflow.StartOptions(
                vm_name=m["vm_name"],
                target_host=m["target_host"],
                target_datastore=m["target_datastore"],
                network_map=m.get("network_map") or {},
                switch_mode=plan.switch_mode,
                switch_at=plan.switch_at,
                power_on_after=plan.power_on_after,
                hooks=plan.hooks or None,
                reason=reason,
            )
            started.append(workflow.start_failback(actor, m["replica_id"], options, plan=plan, plan_order=order))
    except Refused as refused:
        for session in started:
            workflow.transition(
                session.pk, "cancel", actor=actor, detail=f"Withdrawn: plan {plan.name} could not start every member"
            )
        # The row stays with its withdrawn members, for the record; the name is freed for the corrected attempt.
        FailbackPlan.objects.filter(pk=plan.pk).update(name=f"{plan.name[:70]} (not started, #{plan.pk})")
        _refuse(f"Plan {plan.name} not started: {refused.message}", ACTION_START, actor, plan)


def queue_next(plan_id):
    """Hand the next members' phase 1 to workers, in plan order, within the concurrency limit."""
    with transaction.atomic():
        plan = FailbackPlan.objects.select_for_update().get(pk=plan_id)
        busy = plan.sessions.filter(
            Q(status=SessionStatus.PHASE1) | Q(status=SessionStatus.QUEUED, enqueued_at__isnull=False)
        ).count()
        waiting = plan.sessions.filter(status=SessionStatus.QUEUED, enqueued_at__isnull=True).order_by(
            "plan_order", "pk"
        )
        for session in waiting[: max(0, plan.concurrency - busy)]:
            FailbackSession.objects.filter(pk=session.pk).update(enqueued_at=timezone.now())
            enqueue("phase1", session.pk)


def switch_if_due(plan_id, *, trigger="auto", actor=None, reason=""):
    """Switch every member at once when all are Ready to switch and the plan's moment has come."""
    plan = FailbackPlan.objects.get(pk=plan_id)
    manual = trigger == "manual"
    if plan.switch_started_at is not None:
        if manual:
            when = f"{plan.switch_started_at:%Y-%m-%d %H:%M:%S %Z}"
            _refuse(f"Switch refused: plan {plan.name} has already switched (at {when}).", "switch_plan", actor, plan)
        return False
    if trigger == "auto" and not _moment_came(plan):
        return False
    live = [s for s in plan.sessions.order_by("plan_order", "pk") if s.status not in OUT_OF_PLAY]
    ready = [s for s in live if s.status == SessionStatus.READY_TO_SWITCH]
    if not live or len(ready) != len(live):
        _not_ready(plan, trigger, actor, f"{len(ready)} of {len(live)}")
        return False
    if manual:
        approvals.gate_plan(actor, Approvable.SWITCH, plan, live[0], reason=reason)
    elif approvals.hold_plan(plan, live[0], Approvable.SWITCH, _moment(plan, trigger, reason), trigger=trigger):
        return False  # a second person approves the portal's moment first (its request says so, and is told)
    now = timezone.now()
    if FailbackPlan.objects.filter(pk=plan.pk, switch_started_at__isnull=True).update(switch_started_at=now) != 1:
        if manual:
            _refuse(f"Switch refused: plan {plan.name} has already switched.", "switch_plan", actor, plan)
        return False
    late = (now - plan.switch_at).total_seconds() if not manual and plan.switch_at else 0
    _audit(
        "switch_plan",
        actor,
        plan,
        f"Plan {plan.name} switches {len(live)} member(s) in order ({trigger}"
        + (f", {late:.0f} s late" if late > 60 else "")
        + ")"
        + (f": {reason}" if reason else ""),
        trigger=trigger,
        reason=reason,
    )
    _switch_members(plan, live, trigger, actor, now)
    return True


def _moment(plan, trigger, reason):
    """The portal's own moment, in words: what a request for approval of it says."""
    if trigger == "scheduled" and plan.switch_at:
        return f"Scheduled switch of plan {plan.name} due {plan.switch_at:%Y-%m-%d %H:%M:%S %Z}"
    if trigger == "window":
        return f"Switch of plan {plan.name} {reason or 'in a maintenance window'}"
    return f"Automatic switch of plan {plan.name}: every member is Ready to switch"


def _moment_came(plan):
    if approvals.running_for_plan(plan) is not None:
        return True  # the portal's moment came earlier and waited for approval; it is approved now
    if plan.switch_mode == SwitchMode.MANUAL or windows.gated(plan):
        return False  # manual, or waiting for a window where the downtime fits (automatic.plan_switch_when_fits)
    return plan.switch_mode != SwitchMode.SCHEDULED or bool(plan.switch_at and plan.switch_at <= timezone.now())


def _not_ready(plan, trigger, actor, count):
    if trigger == "manual":
        _refuse(
            f"Switch refused: plan {plan.name} is not ready: {count} member(s) are Ready to switch.",
            "switch_plan",
            actor,
            plan,
        )
    if trigger == "scheduled":
        _audit(
            "switch_plan",
            None,
            plan,
            f"Plan {plan.name}: the scheduled switch is due; it starts when every member is Ready to switch "
            f"({count} now).",
            Outcome.INFO,
        )


def _switch_members(plan, live, trigger, actor, now):
    for s in live:
        try:
            workflow.transition(
                s.pk,
                "switch",
                actor=actor,
                detail=f"Plan {plan.name} switch ({trigger})",
                switch_started_at=now,
                heartbeat_at=now,
                data={"plan": plan.name, "trigger": trigger, **_approved(plan)},
            )
        except Refused:
            pass  # audited; the others go on
    drop_plan_schedule(plan.pk)
    transaction.on_commit(
        lambda: async_task("failback.tasks.plan_switch", plan.pk, task_name=f"plan-switch-{plan.pk}-{now:%H%M%S%f}")
    )


def switch_now(actor, plan_id, *, reason=""):
    require_operator(actor, "switch_plan")
    reason = clean_reason(reason, action="switch_plan", actor=actor)
    return switch_if_due(plan_id, trigger="manual", actor=actor, reason=reason)


def scheduled_switch_due(plan_id):
    wait_for_moment(lambda: FailbackPlan.objects.filter(pk=plan_id).values_list("switch_at", flat=True).first())
    plan = FailbackPlan.objects.filter(pk=plan_id).first()
    if (
        plan is not None
        and plan.switch_mode == SwitchMode.SCHEDULED
        and plan.switch_at
        and plan.switch_at <= timezone.now() + timedelta(seconds=1)
    ):
        switch_if_due(plan_id, trigger="scheduled")


def schedule_switch(actor, plan_id, switch_at, *, reason=""):
    action = "schedule_plan_switch"
    require_operator(actor, action)
    reason = clean_reason(reason, action=action, actor=actor)
    validate_switch_time(switch_at, action=action, actor=actor)
    plan = FailbackPlan.objects.get(pk=plan_id)
    live = plan.sessions.exclude(status__in=OUT_OF_PLAY).order_by("plan_order", "pk").first()
    if plan.switch_started_at is None and live is not None:
        approvals.gate_plan(actor, Approvable.SCHEDULE_SWITCH, plan, live, switch_at=switch_at, reason=reason)
    with transaction.atomic():
        if (
            FailbackPlan.objects.filter(pk=plan.pk, switch_started_at__isnull=True).update(
                switch_mode=SwitchMode.SCHEDULED, switch_at=switch_at
            )
            == 1
        ):
            plan.sessions.exclude(status__in=OUT_OF_PLAY).update(switch_mode=SwitchMode.SCHEDULED, switch_at=switch_at)
            plan.refresh_from_db()
            set_plan_schedule(plan)
            broadcast.plan_changed(plan.pk)  # its members' pages and the dashboard show the new moment
            audit(
                action=action,
                actor=actor,
                detail=f"Plan {plan.name}: switch scheduled for {switch_at:%Y-%m-%d %H:%M:%S %Z}"
                + (f": {reason}" if reason else ""),
                data={"plan": plan.name, "plan_id": plan.pk, "switch_at": switch_at.isoformat(), **_approved(plan)},
            )
            return plan
    _refuse(f"Schedule switch refused: plan {plan.name} has already switched.", action, actor, plan)


def _finalise(actor, plan_id, action, reason):
    require_operator(actor, f"{action}_plan")
    plan = FailbackPlan.objects.get(pk=plan_id)
    done, refused = [], []
    members = list(plan.sessions.filter(status=SessionStatus.FAILBACK).order_by("plan_order", "pk"))
    if members:  # one request for the whole plan when the action needs approval; its members' run under it
        approvals.gate_plan(actor, action, plan, members[0], reason=reason)
    for s in members:
        try:
            getattr(workflow, action)(actor, s.pk, reason=reason)
            done.append(s.pk)
        except Refused as exc:
            refused.append(exc.message)
    if not done:
        _refuse(
            f"{action.capitalize()} refused: no member of plan {plan.name} is in Failback.",
            f"{action}_plan",
            actor,
            plan,
        )
    _audit(
        f"{action}_plan",
        actor,
        plan,
        f"Plan {plan.name}: {action} of {len(done)} member(s)" + (f"; {len(refused)} refused" if refused else ""),
        sessions=done,
        refused=refused,
    )
    return done


def commit(actor, plan_id, *, reason=""):
    return _finalise(actor, plan_id, "commit", reason)


def undo(actor, plan_id, *, reason=""):
    return _finalise(actor, plan_id, "undo", reason)


def wait_between_power_ons(plan, pending_ids):
    """The delay between two members' power-ons; the waiting members keep beating their heartbeat."""
    deadline = time.monotonic() + plan.power_on_delay_s
    while time.monotonic() < deadline:
        FailbackSession.objects.filter(pk__in=pending_ids).update(heartbeat_at=timezone.now())
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
