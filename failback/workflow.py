"""The service layer: the only place failback's business rules live.

One function per user action (start_failback, switch_now, schedule_switch, commit, undo), used by
views, tasks and tests alike. Every state change goes through ``transition()``: the session row is
locked (PostgreSQL ``SELECT ... FOR UPDATE``; SQLite runs every transaction as ``BEGIN IMMEDIATE``),
its status checked against ``choices.TRANSITIONS``, changed together with the replica's state, and
audited in the same transaction. A refusal is audited too, in its own transaction, and raised as
``Refused`` with a message meant for the person who clicked.
"""

import logging
import re
from contextlib import closing
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django_q.models import Schedule
from django_q.tasks import async_task

from . import broadcast, plans
from .choices import ACTIVE, SCHEDULABLE, TERMINAL, TRANSITIONS, Outcome, ReplicaState, SessionStatus, SwitchMode
from .models import AuditEvent, FailbackSession, Replica, SessionDisk

log = logging.getLogger(__name__)

OPERATE_PERMISSION = "failback.operate_failback"
VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
REASON_MAX = 500


class Refused(Exception):
    """An action that is not allowed now, or input that cannot be accepted. Already audited."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


def actor_name(actor):
    return actor.get_username() if actor is not None else "system"


def audit(*, action, outcome=Outcome.OK, actor=None, session=None, replica=None, from_state="", to_state="", detail="", data=None, name=None):
    if isinstance(session, int):
        session = FailbackSession.objects.filter(pk=session).first() or None
    if replica is None and session is not None:
        replica = session.replica_id
    return AuditEvent.objects.create(
        actor=actor,
        actor_name=name or actor_name(actor),  # name: who it claimed to be, when nobody is logged in
        action=action,
        session_id=getattr(session, "pk", session),
        replica_id=getattr(replica, "pk", replica),
        from_state=from_state or "",
        to_state=to_state or "",
        outcome=outcome,
        detail=detail,
        data=data or {},
    )


def refuse(message, *, action, actor=None, session=None, replica=None, from_state="", data=None):
    """Audit a refused attempt (committed even if the caller's transaction rolls back) and raise."""
    with transaction.atomic():
        audit(action=action, outcome=Outcome.REFUSED, actor=actor, session=session, replica=replica, from_state=from_state, detail=message, data=data)
    raise Refused(message)


def _require_operator(actor, action, **where):
    if actor is None or not actor.has_perm(OPERATE_PERMISSION):
        refuse(f"{actor_name(actor)} may not {TRANSITIONS.get(action).label.lower() if action in TRANSITIONS else action.replace('_', ' ')}: the Operator role is needed.", action=action, actor=actor, **where)


def _clean_reason(reason, *, action, actor, **where):
    reason = (reason or "").strip()
    if len(reason) > REASON_MAX:
        refuse(f"The reason is too long ({len(reason)} characters; at most {REASON_MAX}).", action=action, actor=actor, **where)
    return reason


def _status_label(status):
    return SessionStatus(status).label


def _refusal(action, session):
    spec = TRANSITIONS[action]
    if session.status in TERMINAL:
        why = f"failback #{session.pk} has already ended ({_status_label(session.status)})"
    elif action == "commit" and session.status in (SessionStatus.QUEUED, SessionStatus.PHASE1, SessionStatus.READY_TO_SWITCH, SessionStatus.SWITCHING):
        why = f"failback #{session.pk} has not switched yet ({_status_label(session.status)}); commit is possible only in Failback"
    elif action == "switch" and session.status in (SessionStatus.SWITCHING, SessionStatus.FAILBACK, SessionStatus.COMMITTING, SessionStatus.UNDOING):
        why = f"failback #{session.pk} has already switched ({_status_label(session.status)})"
    else:
        needs = " or ".join(_status_label(s) for s in sorted(spec.sources))
        why = f"failback #{session.pk} is {_status_label(session.status)}; {spec.label.lower()} needs {needs}"
    return f"{spec.label} refused: {why}."


def transition(session_id, action, *, actor=None, detail="", data=None, then=None, **fields):
    """Move a session along TRANSITIONS[action]; exactly one caller wins, the others are refused.

    ``then(session)`` runs inside the same transaction (queue the next step, drop a schedule). Callers
    must not wrap this in their own transaction: the refusal's audit row has to survive the refusal.
    """
    spec = TRANSITIONS[action]
    now = timezone.now()
    with transaction.atomic():
        session = FailbackSession.objects.select_for_update().filter(pk=session_id).first()
        if session is None:
            message = f"{spec.label} refused: there is no failback #{session_id}."
        elif session.status not in spec.sources:
            message = _refusal(action, session)
        else:
            old = session.status
            session.status = spec.target
            for name, value in fields.items():
                setattr(session, name, value)
            changed = ["status", *fields]
            if spec.target in TERMINAL:
                session.ended_at = now
                changed.append("ended_at")
            session.save(update_fields=changed)
            replica_detail = ""
            if spec.replica_to:
                moved = Replica.objects.filter(pk=session.replica_id, state=spec.replica_from).update(state=spec.replica_to, updated_at=now)
                if moved != 1:
                    # The replica is not where this step expects it: stop rather than guess.
                    raise IntegrityError(f"{spec.label}: replica {session.replica_id} is not {ReplicaState(spec.replica_from).label}")
                replica_detail = f"; replica {ReplicaState(spec.replica_from).label} → {ReplicaState(spec.replica_to).label}"
                audit(
                    action="replica_state", actor=actor, session=session, from_state=spec.replica_from, to_state=spec.replica_to,
                    detail=f"Replica state {ReplicaState(spec.replica_from).label} → {ReplicaState(spec.replica_to).label} ({spec.label.lower()})",
                )
            audit(action=action, actor=actor, session=session, from_state=old, to_state=spec.target, detail=(detail + replica_detail).lstrip("; "), data=data)
            if then is not None:
                then(session)
            broadcast.session_changed(session.pk)
            return session
    refuse(message, action=action, actor=actor, session=session, from_state=session.status if session else "", data=data)


# -- background work ---------------------------------------------------------------------------

def _enqueue(task, session_id, **kwargs):
    """Queue a step for a worker once the current transaction has committed (primary key only)."""
    transaction.on_commit(lambda: async_task(f"failback.tasks.{task}", session_id, **kwargs,
                                             task_name=f"{task}-{session_id}-{timezone.now():%H%M%S%f}", group=f"session-{session_id}"))


# Which step a running status belongs to, for the watchdog.
STEP_OF = {SessionStatus.PHASE1: "phase1", SessionStatus.SWITCHING: "phase2", SessionStatus.COMMITTING: "commit", SessionStatus.UNDOING: "undo"}


def recover_stalled():
    """Queue again every step whose worker stopped showing signs of life (killed, machine lost).

    The heartbeat is claimed with a compare-and-swap, so two watchdogs (or two web processes) resume a
    session once. Steps are written to resume: phase 1 continues from its checkpoints, phase 2 from
    where it stopped (a replica already off stays off; the delta is sent again)."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.FAILBACK_STALL_SECONDS)
    resumed = []
    for session in FailbackSession.objects.filter(status__in=list(STEP_OF), heartbeat_at__lt=cutoff):
        with transaction.atomic():
            claimed = FailbackSession.objects.filter(pk=session.pk, status=session.status, heartbeat_at=session.heartbeat_at).update(heartbeat_at=now)
            if claimed != 1:
                continue
            silent = (now - session.heartbeat_at).total_seconds()
            audit(action="resume", outcome=Outcome.INFO, session=session, from_state=session.status, to_state=session.status,
                  detail=f"No sign of life from the worker for {silent:.0f} s while {session.get_status_display().lower()}: the step is queued again and resumes where it stopped",
                  data={"silent_s": round(silent, 1), "step": STEP_OF[session.status]})
            _enqueue(STEP_OF[session.status], session.pk, resume=True)
            broadcast.session_changed(session.pk)
        resumed.append(session.pk)
    return resumed


def _schedule_name(session_id):
    return f"failback-switch-{session_id}"


def _set_switch_schedule(session):
    """One django-q2 schedule per session fires the scheduled switch; the time itself lives on the session."""
    Schedule.objects.update_or_create(
        name=_schedule_name(session.pk),
        defaults={
            "func": "failback.tasks.scheduled_switch",
            "args": str(session.pk),
            "schedule_type": Schedule.ONCE,
            "repeats": 1,
            "next_run": session.switch_at,
        },
    )


def _drop_switch_schedule(session_id):
    Schedule.objects.filter(name=_schedule_name(session_id)).delete()


# -- user actions ------------------------------------------------------------------------------

def validate_switch_time(switch_at, *, action, actor, **where):
    if switch_at is None:
        refuse("A scheduled switch needs a date and time.", action=action, actor=actor, **where)
    if timezone.is_naive(switch_at):
        refuse("The switch time must include a time zone.", action=action, actor=actor, **where)
    if switch_at <= timezone.now() + timedelta(seconds=5):
        refuse(f"The switch time {switch_at:%Y-%m-%d %H:%M:%S %Z} is in the past; pick a time in the future.", action=action, actor=actor, **where)
    if switch_at > timezone.now() + timedelta(days=366):
        refuse("The switch time is more than a year away.", action=action, actor=actor, **where)


def start_failback(actor, replica_id, *, vm_name, target_host, target_datastore, switch_mode=SwitchMode.MANUAL, switch_at=None,
                   power_on_after=True, network_map=None, reason="", shutdown_timeout_s=None, resource_pool="", folder="",
                   bandwidth_mbps=None, plan=None, plan_order=0):
    """Start a failback of one replica in Failover: queue phase 1 (create the production VM, copy the data)."""
    action = "start_failback"
    replica = Replica.objects.filter(pk=replica_id).first()
    if replica is None:
        refuse(f"Start failback refused: there is no replica #{replica_id}.", action=action, actor=actor)
    _require_operator(actor, action, replica=replica)
    reason = _clean_reason(reason, action=action, actor=actor, replica=replica)
    if switch_mode not in SwitchMode.values:
        refuse(f"Unknown switch mode {switch_mode!r}; choose one of {', '.join(SwitchMode.values)}.", action=action, actor=actor, replica=replica)
    if switch_mode == SwitchMode.SCHEDULED and plan is None:  # a plan's members follow the plan's (validated) time
        validate_switch_time(switch_at, action=action, actor=actor, replica=replica)
    elif switch_mode != SwitchMode.SCHEDULED:
        switch_at = None
    vm_name = (vm_name or "").strip()
    if not VM_NAME_RE.match(vm_name):
        refuse("The production VM name must be 1-80 letters, digits, dots, dashes or underscores, starting with a letter or digit.", action=action, actor=actor, replica=replica)
    from .hypervisors.registry import hypervisor_for  # the platform is asked outside any transaction

    with closing(hypervisor_for(replica)) as hv:
        inventory = hv.inventory()
        placement = hv.placement() if hasattr(hv, "placement") and (resource_pool or folder) else None
    if resource_pool and resource_pool not in placement.resource_pools:
        refuse(f"Unknown resource pool {resource_pool!r}.", action=action, actor=actor, replica=replica)
    if folder and folder not in placement.folders:
        refuse(f"Unknown folder {folder!r}.", action=action, actor=actor, replica=replica)
    if target_host not in inventory.hosts:
        refuse(f"Unknown target host {target_host!r}.", action=action, actor=actor, replica=replica)
    if target_datastore not in inventory.datastores:
        refuse(f"Unknown target datastore {target_datastore!r}.", action=action, actor=actor, replica=replica)
    needed = sum(d.capacity_bytes for d in replica.disks.all())
    if inventory.datastores[target_datastore] < needed:
        refuse(f"Datastore {target_datastore} has {inventory.datastores[target_datastore] / 2**30:.1f} GiB free; the disks need {needed / 2**30:.1f} GiB.", action=action, actor=actor, replica=replica)
    if any(vm.name == vm_name for vm in inventory.vms):
        refuse(f"A VM named {vm_name!r} already exists; pick another name.", action=action, actor=actor, replica=replica)
    network_map = dict(network_map or {})
    replica_vm = next((vm for vm in inventory.vms if vm.vm_id == replica.vm_id), None)
    if replica_vm is None:
        refuse(f"Start failback refused: the replica VM {replica.name} ({replica.vm_id}) is not in the platform's inventory.", action=action, actor=actor, replica=replica)
    unmapped = sorted({nic.network for nic in replica_vm.nics if nic.network and nic.network not in network_map})
    if unmapped:
        refuse(f"Map every replica network to a target network or to disconnected: {', '.join(unmapped)} not mapped.", action=action, actor=actor, replica=replica)
    for target in network_map.values():
        if target is not None and target not in inventory.networks:
            refuse(f"Unknown target network {target!r}.", action=action, actor=actor, replica=replica)
    if bandwidth_mbps is not None and not 1 <= int(bandwidth_mbps) <= 100_000:
        refuse("The bandwidth limit must be between 1 and 100000 MB/s (or none).", action=action, actor=actor, replica=replica)
    timeout = shutdown_timeout_s or settings.FAILBACK_SHUTDOWN_TIMEOUT
    options = {
        "vm_name": vm_name, "target_host": target_host, "target_datastore": target_datastore, "network_map": network_map,
        "resource_pool": resource_pool or "", "folder": folder or "",
        "switch_mode": switch_mode, "switch_at": switch_at.isoformat() if switch_at else None,
        "power_on_after": bool(power_on_after), "shutdown_timeout_s": timeout, "reason": reason, "bandwidth_mbps": bandwidth_mbps,
    }
    message = None
    try:
        with transaction.atomic():
            replica = Replica.objects.select_for_update().get(pk=replica.pk)
            active = FailbackSession.objects.filter(replica=replica, status__in=ACTIVE).first()
            if active is not None:
                message = f"Start failback refused: replica {replica.name} already has failback #{active.pk} ({active.get_status_display()})."
            elif replica.state != ReplicaState.FAILOVER:
                message = f"Start failback refused: replica {replica.name} is {replica.get_state_display()}; failback starts only from Failover."
            else:
                session = FailbackSession.objects.create(
                    replica=replica, vm_name=vm_name, target_host=target_host, target_datastore=target_datastore,
                    network_map=network_map, resource_pool=resource_pool or "", folder=folder or "",
                    switch_mode=switch_mode, switch_at=switch_at, power_on_after=bool(power_on_after),
                    shutdown_timeout_s=timeout, started_by=actor, reason=reason, bandwidth_mbps=bandwidth_mbps,
                    plan=plan, plan_order=plan_order,
                )
                SessionDisk.objects.bulk_create(
                    SessionDisk(session=session, key=d.key, capacity_bytes=d.capacity_bytes) for d in replica.disks.all()
                )
                audit(action=action, actor=actor, session=session, to_state=SessionStatus.QUEUED,
                      detail=f"Failback of {replica.name} to {vm_name} on {target_host}/{target_datastore}; switch {SwitchMode(switch_mode).label.lower()}"
                      + (f"; reason: {reason}" if reason else ""), data=options)
                if plan is None:  # a plan queues its members itself, within its concurrency limit
                    if switch_mode == SwitchMode.SCHEDULED:
                        _set_switch_schedule(session)
                    session.enqueued_at = timezone.now()
                    session.save(update_fields=["enqueued_at"])
                    _enqueue("phase1", session.pk)
                broadcast.session_changed(session.pk)
                return session
    except IntegrityError:
        # The partial unique index caught a race the lock could not (another request won).
        message = f"Start failback refused: replica {replica.name} already has a failback in progress."
    refuse(message, action=action, actor=actor, replica=replica, data=options)


def _refuse_plan_member(actor, action, session_id):
    session = FailbackSession.objects.select_related("plan").filter(pk=session_id).first()
    if session is not None and session.plan_id:
        refuse(f"{TRANSITIONS['switch'].label if action == 'switch' else 'Schedule switch'} refused: failback #{session.pk} belongs to plan "
               f"{session.plan.name}, which switches its members together and in order; use the plan's buttons.",
               action=action, actor=actor, session=session, from_state=session.status)


def switch_now(actor, session_id, *, reason=""):
    """Start phase 2 at once: stop the replica, send the last changes, power on production."""
    _require_operator(actor, "switch", session=session_id)
    _refuse_plan_member(actor, "switch", session_id)
    reason = _clean_reason(reason, action="switch", actor=actor, session=session_id)
    return _begin_switch(session_id, actor=actor, detail=f"Switch now{': ' + reason if reason else ''}", data={"reason": reason, "trigger": "manual"})


def _begin_switch(session_id, *, actor, detail, data):
    def then(session):
        _drop_switch_schedule(session.pk)
        _enqueue("phase2", session.pk)

    return transition(session_id, "switch", actor=actor, detail=detail, data=data, then=then, switch_started_at=timezone.now())


def schedule_switch(actor, session_id, switch_at, *, reason=""):
    """Set or change the switch moment to a time in the future (legal until the switch begins)."""
    action = "schedule_switch"
    _require_operator(actor, action, session=session_id)
    _refuse_plan_member(actor, action, session_id)
    reason = _clean_reason(reason, action=action, actor=actor, session=session_id)
    validate_switch_time(switch_at, action=action, actor=actor, session=session_id)
    with transaction.atomic():
        session = FailbackSession.objects.select_for_update().filter(pk=session_id).first()
        if session is not None and session.status in SCHEDULABLE:
            before = {"switch_mode": session.switch_mode, "switch_at": session.switch_at.isoformat() if session.switch_at else None}
            session.switch_mode, session.switch_at = SwitchMode.SCHEDULED, switch_at
            session.save(update_fields=["switch_mode", "switch_at"])
            _set_switch_schedule(session)
            audit(action=action, actor=actor, session=session, from_state=session.status, to_state=session.status,
                  detail=f"Switch scheduled for {switch_at:%Y-%m-%d %H:%M:%S %Z}{': ' + reason if reason else ''}",
                  data={"before": before, "after": {"switch_mode": SwitchMode.SCHEDULED, "switch_at": switch_at.isoformat()}, "reason": reason})
            broadcast.session_changed(session.pk)
            return session
    if session is None:
        refuse(f"Schedule switch refused: there is no failback #{session_id}.", action=action, actor=actor)
    refuse(f"Schedule switch refused: failback #{session.pk} is {session.get_status_display()}; the switch time can change only before the switch begins.",
           action=action, actor=actor, session=session, from_state=session.status)


def commit(actor, session_id, *, reason=""):
    """Keep production: the replica returns to Ready and the production VM takes the source's place."""
    _require_operator(actor, "commit", session=session_id)
    reason = _clean_reason(reason, action="commit", actor=actor, session=session_id)
    return transition(session_id, "commit", actor=actor, detail=reason, data={"reason": reason}, then=lambda s: _enqueue("commit", s.pk))


def undo(actor, session_id, *, reason=""):
    """Go back to the replica: production off (its changes since the switch discarded), replica on."""
    _require_operator(actor, "undo", session=session_id)
    reason = _clean_reason(reason, action="undo", actor=actor, session=session_id)
    return transition(session_id, "undo", actor=actor, detail=reason, data={"reason": reason}, then=lambda s: _enqueue("undo", s.pk))


def declare_failover(actor, replica_id, *, reason=""):
    """Record that a replica now runs the workload (Ready -> Failover), so a failback may start later."""
    action = "declare_failover"
    replica = Replica.objects.filter(pk=replica_id).first()
    if replica is None:
        refuse(f"Declare failover refused: there is no replica #{replica_id}.", action=action, actor=actor)
    _require_operator(actor, action, replica=replica)
    reason = _clean_reason(reason, action=action, actor=actor, replica=replica)
    from .hypervisors.base import POWERED_ON
    from .hypervisors.registry import hypervisor_for

    with closing(hypervisor_for(replica)) as hv:
        power = hv.power_state(replica.vm_id)
    if power != POWERED_ON:
        refuse(f"Declare failover refused: {replica.name} is {power}; a replica in failover runs the workload, so power it on first.",
               action=action, actor=actor, replica=replica)
    with transaction.atomic():
        if Replica.objects.filter(pk=replica.pk, state=ReplicaState.READY).update(state=ReplicaState.FAILOVER, updated_at=timezone.now()) == 1:
            audit(action=action, actor=actor, replica=replica, from_state=ReplicaState.READY, to_state=ReplicaState.FAILOVER,
                  detail=f"{replica.name} runs the workload of {replica.source_name}{': ' + reason if reason else ''}", data={"reason": reason})
            return Replica.objects.get(pk=replica.pk)
    refuse(f"Declare failover refused: {replica.name} is {Replica.objects.get(pk=replica.pk).get_state_display()}, not Ready.",
           action=action, actor=actor, replica=replica)


# -- called by the worker and the scheduler ----------------------------------------------------

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
        _begin_switch(session_id, actor=None, detail="Automatic switch after phase 1", data={"trigger": "auto"})
    elif session.switch_mode == SwitchMode.SCHEDULED and session.switch_at and session.switch_at <= timezone.now():
        late = (timezone.now() - session.switch_at).total_seconds()
        _begin_switch(session_id, actor=None, detail=f"Scheduled switch (due {session.switch_at:%Y-%m-%d %H:%M:%S %Z}) started when phase 1 ended, {late:.0f} s late",
                      data={"trigger": "scheduled", "due": session.switch_at.isoformat(), "late_s": late})


def scheduled_switch_due(session_id):
    """The django-q2 schedule fired. The session decides whether that still means anything."""
    session = FailbackSession.objects.filter(pk=session_id).first()
    if session is None:
        return
    now = timezone.now()
    if session.switch_mode != SwitchMode.SCHEDULED or session.status not in SCHEDULABLE:
        with transaction.atomic():
            audit(action="scheduled_switch", outcome=Outcome.INFO, session=session, from_state=session.status,
                  detail=f"Scheduled switch skipped: failback #{session.pk} is {session.get_status_display()} with switch {session.get_switch_mode_display().lower()}.")
        return
    if session.switch_at and session.switch_at > now + timedelta(seconds=1):
        with transaction.atomic():
            audit(action="scheduled_switch", outcome=Outcome.INFO, session=session, from_state=session.status,
                  detail=f"Scheduled switch skipped: it was moved to {session.switch_at:%Y-%m-%d %H:%M:%S %Z}.")
            _set_switch_schedule(session)
        return
    if session.status != SessionStatus.READY_TO_SWITCH:
        with transaction.atomic():
            audit(action="scheduled_switch", outcome=Outcome.INFO, session=session, from_state=session.status,
                  detail="Scheduled switch is due while phase 1 runs; it starts as soon as phase 1 ends.")
        return
    late = (now - session.switch_at).total_seconds()
    _begin_switch(session_id, actor=None, detail=f"Scheduled switch (due {session.switch_at:%Y-%m-%d %H:%M:%S %Z}){f', {late:.0f} s late' if late > 60 else ''}",
                  data={"trigger": "scheduled", "due": session.switch_at.isoformat(), "late_s": round(late, 1)})
