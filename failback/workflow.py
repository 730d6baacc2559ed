"""The service layer: the only place failback's business rules live.

One function per user action (start_failback, switch_now, schedule_switch, commit, undo), used by
views, tasks and tests alike. Every state change goes through ``transition()``: the session row is
locked (PostgreSQL ``SELECT ... FOR UPDATE``; SQLite runs every transaction as ``BEGIN IMMEDIATE``),
its status checked against ``choices.TRANSITIONS``, changed together with the replica's state, and
audited in the same transaction. A refusal is audited too, in its own transaction, and raised as
``Refused`` with a message meant for the person who clicked.
"""

import logging
from contextlib import closing
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from . import approvals, broadcast
from . import checks as prechecks
from .audit import (  # noqa: F401 (Refused, refuse, refuse_input and the permissions are the service layer's API too)
    OPERATE_PERMISSION,
    OVERRIDE_PERMISSION,
    REASON_MAX,
    Refused,
    actor_name,
    audit,
    clean_reason,
    refuse,
    refuse_input,
    require_operator,
)
from .choices import (
    ACTIVE,
    CANCELLABLE,
    GUARDS,
    SCHEDULABLE,
    STEP_OF,
    TERMINAL,
    TRANSITIONS,
    CommitPolicy,
    Outcome,
    ReplicaState,
    SessionStatus,
    SwitchMode,
)
from .hypervisors.base import HypervisorError
from .models import FailbackSession, Replica
from .schedules import (
    drop_policy_schedule,
    drop_switch_schedule,
    enqueue,
    set_policy_schedule,
    set_switch_schedule,
    validate_switch_time,
)
from .starting import StartOptions, name_scope, start_failback  # noqa: F401 (the service layer's entry points)

log = logging.getLogger(__name__)


def _status_label(status):
    return SessionStatus(status).label


def _refusal(action, session):
    spec = TRANSITIONS[action]
    if session.status in TERMINAL:
        why = f"failback #{session.pk} has already ended ({_status_label(session.status)})"
    elif action == "commit" and session.status in (
        SessionStatus.QUEUED,
        SessionStatus.PHASE1,
        SessionStatus.READY_TO_SWITCH,
        SessionStatus.SWITCHING,
    ):
        why = f"failback #{session.pk} has not switched yet ({_status_label(session.status)}); commit is possible only in Failback"
    elif action == "switch" and session.status in (
        SessionStatus.SWITCHING,
        SessionStatus.FAILBACK,
        SessionStatus.COMMITTING,
        SessionStatus.UNDOING,
    ):
        why = f"failback #{session.pk} has already switched ({_status_label(session.status)})"
    else:
        needs = " or ".join(_status_label(s) for s in sorted(spec.sources))
        why = f"failback #{session.pk} is {_status_label(session.status)}; {spec.label.lower()} needs {needs}"
    return f"{spec.label} refused: {why}."


class LeaseLost(Exception):
    """This run of a step no longer holds the session's lease (another worker took the step over):
    it stops at once and writes nothing more: no row, no progress, no platform action."""


def transition(session_id, action, *, actor=None, detail="", data=None, then=None, lease=None, **fields):
    """Move a session along TRANSITIONS[action]; exactly one caller wins, the others are refused.

    ``then(session)`` runs inside the same transaction (queue the next step, drop a schedule). Callers
    must not wrap this in their own transaction: the refusal's audit row has to survive the refusal.
    ``lease``: a worker's fencing token (jobs.Run); when the session's lease has moved on, the step was
    taken over and LeaseLost is raised without writing anything.
    """
    spec = TRANSITIONS[action]
    with transaction.atomic():
        session = FailbackSession.objects.select_for_update().filter(pk=session_id).first()
        if lease is not None and (session is None or session.lease != lease):
            raise LeaseLost(f"{spec.label} not written: failback #{session_id}'s step was taken over by another run")
        if session is None:
            message = f"{spec.label} refused: there is no failback #{session_id}."
        elif session.status not in spec.sources:
            message = _refusal(action, session)
        elif action in GUARDS and GUARDS[action].waits_for_production(session):
            message = (
                f"{spec.label} refused: failback #{session.pk}'s production VM {session.vm_name} has not been powered on "
                "since the switch (the worker powers it on right after the switch, or the watchdog does if that "
                f"worker stopped). {spec.label} once it runs; Undo goes back to the replica."
            )
        else:
            old = _move(session, spec, fields)
            moved = _move_replica(session, spec, actor)
            detail = (detail + moved).lstrip("; ")
            audit(
                action=action,
                actor=actor,
                session=session,
                from_state=old,
                to_state=spec.target,
                detail=detail,
                data=data,
            )
            if then is not None:
                then(session)
            broadcast.session_changed(session.pk)
            return session
    from_state = session.status if session else ""
    refuse(message, action=action, actor=actor, session=session, from_state=from_state, data=data)


def _move(session, spec, fields):
    """The session's new status and fields, saved; returns the status it had."""
    now, old = timezone.now(), session.status
    session.status = spec.target
    for name, value in fields.items():
        setattr(session, name, value)
    changed = ["status", *fields]
    if spec.target in STEP_OF and "heartbeat_at" not in fields:
        # A step is queued now: the watchdog counts its silence from here, not from the last step's.
        session.heartbeat_at = now
        changed.append("heartbeat_at")
    if spec.target in TERMINAL:
        session.ended_at = now
        changed.append("ended_at")
    session.save(update_fields=changed)
    return old


def _move_replica(session, spec, actor):
    """The replica's state change that goes with the step, audited; returns the words for the step's row."""
    if not spec.replica_to:
        return ""
    before, after = ReplicaState(spec.replica_from).label, ReplicaState(spec.replica_to).label
    moved = Replica.objects.filter(pk=session.replica_id, state=spec.replica_from).update(
        state=spec.replica_to, updated_at=timezone.now()
    )
    if moved != 1:  # the replica is not where this step expects it: stop rather than guess
        raise IntegrityError(f"{spec.label}: replica {session.replica_id} is not {before}")
    audit(
        action="replica_state",
        actor=actor,
        session=session,
        from_state=spec.replica_from,
        to_state=spec.replica_to,
        detail=f"Replica state {before} → {after} ({spec.label.lower()})",
    )
    return f"; replica {before} → {after}"


# -- user actions ------------------------------------------------------------------------------


def _guard(actor, action, session_id):
    """Refuse what ``GUARDS[action]`` never allows on this session: a plan member's own switch, schedule or
    cancel. The pages and the API offer only what ``session.allowed_actions`` (the same guards) allow; the
    status itself is checked again under the row lock where the change is made."""
    guard = GUARDS[action]
    session = FailbackSession.objects.select_related("plan").filter(pk=session_id).first()
    if session is not None and session.plan_id and not guard.plan_members:
        refuse(
            f"{guard.label} refused: failback #{session.pk} belongs to plan {session.plan.name}, which switches its members "
            "together and in order; use the plan's buttons.",
            action=action,
            actor=actor,
            session=session,
            from_state=session.status,
        )
    return session


def switch_now(actor, session_id, *, reason="", override_checks=False):
    """Start phase 2 at once: stop the replica, send the last changes, power on production.

    The checks run again first (host, datastore, replica, scheduler clock): the world may have changed."""
    require_operator(actor, "switch", session=session_id)
    _guard(actor, "switch", session_id)
    reason = clean_reason(reason, action="switch", actor=actor, session=session_id)
    approvals.gate(actor, "switch", session_id, reason=reason, override_checks=override_checks)
    session = FailbackSession.objects.select_related("replica").filter(pk=session_id).first()
    found = []
    if session is not None and session.status == SessionStatus.READY_TO_SWITCH:
        found = switch_checks(session)
        prechecks.enforce(found, actor=actor, override=override_checks, reason=reason, action="switch", session=session)
    return begin_switch(
        session_id,
        actor=actor,
        detail=f"Switch now{': ' + reason if reason else ''}",
        data={"reason": reason, "trigger": "manual", "checks": [c.as_dict() for c in found]},
    )


def switch_checks(session):
    from .hypervisors.registry import hypervisor_for

    try:
        with closing(hypervisor_for(session.replica)) as hv:
            return prechecks.before_switch(hv, session)
    except HypervisorError as exc:  # the platform cannot answer now: a failed check, so the switch waits
        return [prechecks.Check("platform", "Platform reachable", prechecks.FAIL, str(exc))]


def begin_switch(session_id, *, actor, detail, data):
    if actor is None:  # automatic (after phase 1, or scheduled): the checks run again; a failure keeps it waiting
        session = FailbackSession.objects.select_related("replica").get(pk=session_id)
        found = switch_checks(session)
        if prechecks.failures(found):
            with transaction.atomic():
                audit(
                    action="switch",
                    outcome=Outcome.REFUSED,
                    session=session,
                    from_state=session.status,
                    to_state=session.status,
                    detail=f"{detail} blocked by the pre-switch checks: {prechecks.summary(found)}. The session stays Ready to switch; "
                    "fix the cause and switch now, or an Administrator switches now with an override.",
                    data={**data, "checks": [c.as_dict() for c in found]},
                )
                broadcast.session_changed(session.pk)
            return None
        data = {**data, "checks": [c.as_dict() for c in found]}

    def then(session):
        drop_switch_schedule(session.pk)
        enqueue("phase2", session.pk)

    return transition(
        session_id, "switch", actor=actor, detail=detail, data=data, then=then, switch_started_at=timezone.now()
    )


def schedule_switch(actor, session_id, switch_at, *, reason=""):
    """Set or change the switch moment to a time in the future (legal until the switch begins)."""
    action = "schedule_switch"
    require_operator(actor, action, session=session_id)
    _guard(actor, action, session_id)
    reason = clean_reason(reason, action=action, actor=actor, session=session_id)
    validate_switch_time(switch_at, action=action, actor=actor, session=session_id)
    approvals.gate(actor, action, session_id, switch_at=switch_at, reason=reason)
    with transaction.atomic():
        session = FailbackSession.objects.select_for_update().filter(pk=session_id).first()
        if session is not None and session.status in SCHEDULABLE:
            before = {
                "switch_mode": session.switch_mode,
                "switch_at": session.switch_at.isoformat() if session.switch_at else None,
            }
            session.switch_mode, session.switch_at = SwitchMode.SCHEDULED, switch_at
            session.save(update_fields=["switch_mode", "switch_at"])
            set_switch_schedule(session)
            audit(
                action=action,
                actor=actor,
                session=session,
                from_state=session.status,
                to_state=session.status,
                detail=f"Switch scheduled for {switch_at:%Y-%m-%d %H:%M:%S %Z}{': ' + reason if reason else ''}",
                data={
                    "before": before,
                    "after": {"switch_mode": SwitchMode.SCHEDULED, "switch_at": switch_at.isoformat()},
                    "reason": reason,
                },
            )
            broadcast.session_changed(session.pk)
            return session
    if session is None:
        refuse(f"Schedule switch refused: there is no failback #{session_id}.", action=action, actor=actor)
    refuse(
        f"Schedule switch refused: failback #{session.pk} is {session.get_status_display()}; the switch time can change only before the switch begins.",
        action=action,
        actor=actor,
        session=session,
        from_state=session.status,
    )


def finalise(action):
    def then(session):
        drop_policy_schedule(session.pk)
        enqueue(action, session.pk)

    return then


def commit(actor, session_id, *, reason=""):
    """Keep production: the replica returns to Ready and the production VM takes the source's place."""
    require_operator(actor, "commit", session=session_id)
    reason = clean_reason(reason, action="commit", actor=actor, session=session_id)
    approvals.gate(actor, "commit", session_id, reason=reason)
    return transition(
        session_id, "commit", actor=actor, detail=reason, data={"reason": reason}, then=finalise("commit")
    )


def undo(actor, session_id, *, reason=""):
    """Go back to the replica: production off (its changes since the switch discarded), replica on."""
    require_operator(actor, "undo", session=session_id)
    reason = clean_reason(reason, action="undo", actor=actor, session=session_id)
    approvals.gate(actor, "undo", session_id, reason=reason)
    return transition(session_id, "undo", actor=actor, detail=reason, data={"reason": reason}, then=finalise("undo"))


def cancel(actor, session_id, *, keep_production_vm=False, reason=""):
    """Stop a failback before the switch. The replica is never touched: it keeps running in Failover.

    Queued: cancelled at once. Phase 1 or Ready to switch: Cancelling; the copy (or a catch-up sync)
    stops at its next progress tick, then the cancel step deletes the half-built production VM or,
    on request, keeps it (powered off) so that the next failback sends only what differs."""
    action = "cancel"
    require_operator(actor, action, session=session_id)
    reason = clean_reason(reason, action=action, actor=actor, session=session_id)
    session = _guard(actor, action, session_id)
    keep = bool(keep_production_vm)
    approvals.gate(actor, action, session_id, keep_production_vm=keep, reason=reason)
    what = "keep the production VM for a retry" if keep else "delete the production VM"
    data = {"reason": reason, "keep_production_vm": keep}
    detail = f"Cancel: {what}{'; reason: ' + reason if reason else ''}"
    status = session.status if session is not None else None
    if status == SessionStatus.QUEUED and not session.production_vm_id:
        return transition(
            session_id,
            "cancel",
            actor=actor,
            detail=detail + " (nothing was built yet)",
            data=data,
            then=lambda s: drop_switch_schedule(s.pk),
        )
    if status in ACTIVE and status not in CANCELLABLE:
        refuse(
            f"Cancel refused: failback #{session.pk} is {_status_label(status)}; cancel is possible only before the switch "
            f"(afterwards, Undo goes back to the replica).",
            action=action,
            actor=actor,
            session=session,
            from_state=status,
        )
    # Missing or ended sessions are refused by transition() with the usual message.
    step = {SessionStatus.READY_TO_SWITCH: "cancel_ready", SessionStatus.QUEUED: "cancel_reused"}.get(
        status, "cancel_phase1"
    )

    def then(s):
        drop_switch_schedule(s.pk)
        enqueue("cancel", s.pk)

    return transition(
        session_id,
        step,
        actor=actor,
        detail=detail,
        data=data,
        then=then,
        keep_production_vm=keep,
        heartbeat_at=timezone.now(),
    )


# -- commit policy -----------------------------------------------------------------------------


def arm_commit_policy(session):
    """Failback reached (inside the finish_switch transaction): start the policy's countdown, if any."""
    if session.commit_policy == CommitPolicy.NONE or not session.commit_after_min:
        return
    session.policy_due_at = timezone.now() + timedelta(minutes=session.commit_after_min)
    session.save(update_fields=["policy_due_at"])
    set_policy_schedule(session)
    what = "commit" if session.commit_policy == CommitPolicy.AUTO_COMMIT else "undo"
    audit(
        action="commit_policy",
        outcome=Outcome.INFO,
        session=session,
        from_state=session.status,
        to_state=session.status,
        detail=f"Automatic {what} at {session.policy_due_at:%Y-%m-%d %H:%M:%S %Z} ({session.commit_after_min} min) unless an operator acts or stops the countdown",
        data={"policy": session.commit_policy, "due": session.policy_due_at.isoformat()},
    )


def stop_commit_policy(actor, session_id, *, reason=""):
    """Stop the countdown: the session stays in Failback until an operator commits or undoes."""
    action = "stop_commit_policy"
    require_operator(actor, action, session=session_id)
    reason = clean_reason(reason, action=action, actor=actor, session=session_id)
    with transaction.atomic():
        session = FailbackSession.objects.select_for_update().filter(pk=session_id).first()
        if (
            session is not None
            and session.status == SessionStatus.FAILBACK
            and session.policy_due_at
            and session.policy_stopped_at is None
        ):
            session.policy_stopped_at = timezone.now()
            session.save(update_fields=["policy_stopped_at"])
            drop_policy_schedule(session.pk)
            audit(
                action=action,
                actor=actor,
                session=session,
                from_state=session.status,
                to_state=session.status,
                detail=f"Countdown to the automatic {'commit' if session.commit_policy == CommitPolicy.AUTO_COMMIT else 'undo'} stopped"
                + (f": {reason}" if reason else ""),
                data={"reason": reason, "was_due": session.policy_due_at.isoformat()},
            )
            broadcast.session_changed(session.pk)
            return session
    if session is None:
        refuse(f"Stop countdown refused: there is no failback #{session_id}.", action=action, actor=actor)
    why = (
        "it was already stopped"
        if session.policy_stopped_at
        else "no automatic commit or undo is counting down"
        if session.status == SessionStatus.FAILBACK
        else f"failback #{session.pk} is {session.get_status_display()}"
    )
    refuse(f"Stop countdown refused: {why}.", action=action, actor=actor, session=session, from_state=session.status)


def declare_failover(actor, replica_id, *, reason=""):
    """Record that a replica now runs the workload (Ready -> Failover), so a failback may start later."""
    action = "declare_failover"
    replica = Replica.objects.filter(pk=replica_id).first()
    if replica is None:
        refuse(f"Declare failover refused: there is no replica #{replica_id}.", action=action, actor=actor)
    require_operator(actor, action, replica=replica)
    reason = clean_reason(reason, action=action, actor=actor, replica=replica)
    from .hypervisors.base import POWERED_ON
    from .hypervisors.registry import hypervisor_for

    with closing(hypervisor_for(replica)) as hv:
        power = hv.power_state(replica.vm_id)
    if power != POWERED_ON:
        refuse(
            f"Declare failover refused: {replica.name} is {power}; a replica in failover runs the workload, so power it on first.",
            action=action,
            actor=actor,
            replica=replica,
        )
    with transaction.atomic():
        if (
            Replica.objects.filter(pk=replica.pk, state=ReplicaState.READY).update(
                state=ReplicaState.FAILOVER, updated_at=timezone.now()
            )
            == 1
        ):
            audit(
                action=action,
                actor=actor,
                replica=replica,
                from_state=ReplicaState.READY,
                to_state=ReplicaState.FAILOVER,
                detail=f"{replica.name} runs the workload of {replica.source_name}{': ' + reason if reason else ''}",
                data={"reason": reason},
            )
            return Replica.objects.get(pk=replica.pk)
    refuse(
        f"Declare failover refused: {replica.name} is {Replica.objects.get(pk=replica.pk).get_state_display()}, not Ready.",
        action=action,
        actor=actor,
        replica=replica,
    )
