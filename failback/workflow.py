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
import secrets
from contextlib import closing
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import broadcast
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
from .models import FailbackSession, Replica, SessionDisk
from .schedules import drop_policy_schedule, drop_switch_schedule, enqueue, set_policy_schedule, set_switch_schedule

log = logging.getLogger(__name__)

COMMIT_AFTER_MAX_MIN = 7 * 24 * 60
VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


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
    now = timezone.now()
    with transaction.atomic():
        session = FailbackSession.objects.select_for_update().filter(pk=session_id).first()
        if lease is not None and (session is None or session.lease != lease):
            raise LeaseLost(f"{spec.label} not written: failback #{session_id}'s step was taken over by another run")
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
            if spec.target in STEP_OF and "heartbeat_at" not in fields:
                # A step is queued now: the watchdog counts its silence from here, not from the last step's.
                session.heartbeat_at = now
                changed.append("heartbeat_at")
            if spec.target in TERMINAL:
                session.ended_at = now
                changed.append("ended_at")
            session.save(update_fields=changed)
            replica_detail = ""
            if spec.replica_to:
                moved = Replica.objects.filter(pk=session.replica_id, state=spec.replica_from).update(
                    state=spec.replica_to, updated_at=now
                )
                if moved != 1:
                    # The replica is not where this step expects it: stop rather than guess.
                    raise IntegrityError(
                        f"{spec.label}: replica {session.replica_id} is not {ReplicaState(spec.replica_from).label}"
                    )
                replica_detail = (
                    f"; replica {ReplicaState(spec.replica_from).label} → {ReplicaState(spec.replica_to).label}"
                )
                audit(
                    action="replica_state",
                    actor=actor,
                    session=session,
                    from_state=spec.replica_from,
                    to_state=spec.replica_to,
                    detail=f"Replica state {ReplicaState(spec.replica_from).label} → {ReplicaState(spec.replica_to).label} ({spec.label.lower()})",
                )
            audit(
                action=action,
                actor=actor,
                session=session,
                from_state=old,
                to_state=spec.target,
                detail=(detail + replica_detail).lstrip("; "),
                data=data,
            )
            if then is not None:
                then(session)
            broadcast.session_changed(session.pk)
            return session
    refuse(
        message, action=action, actor=actor, session=session, from_state=session.status if session else "", data=data
    )


# -- user actions ------------------------------------------------------------------------------


def validate_switch_time(switch_at, *, action, actor, **where):
    if switch_at is None:
        refuse("A scheduled switch needs a date and time.", action=action, actor=actor, **where)
    if timezone.is_naive(switch_at):
        refuse("The switch time must include a time zone.", action=action, actor=actor, **where)
    if switch_at <= timezone.now() + timedelta(seconds=5):
        refuse(
            f"The switch time {switch_at:%Y-%m-%d %H:%M:%S %Z} is in the past; pick a time in the future.",
            action=action,
            actor=actor,
            **where,
        )
    if switch_at > timezone.now() + timedelta(days=366):
        refuse("The switch time is more than a year away.", action=action, actor=actor, **where)


@dataclass(frozen=True)
class StartOptions:
    """What a failback starts with: the start form, the API's body and a plan's members each build one."""

    vm_name: str
    target_host: str
    target_datastore: str
    switch_mode: str = SwitchMode.MANUAL
    switch_at: datetime | None = None
    power_on_after: bool = True
    network_map: dict = field(default_factory=dict)
    reason: str = ""
    shutdown_timeout_s: int | None = None
    resource_pool: str = ""
    folder: str = ""
    bandwidth_mbps: int | None = None
    commit_policy: str = CommitPolicy.NONE
    commit_after_min: int | None = None
    override_checks: bool = False

    def record(self, found, kept):
        """The options as the audit row keeps them."""
        return {
            **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "override_checks"},
            "switch_at": self.switch_at.isoformat() if self.switch_at else None,
            "reuses": {"session": kept.pk, "vm_id": kept.production_vm_id} if kept else None,
            "checks": [c.as_dict() for c in found],
        }


@dataclass
class _Facts:
    """What the platform says about a start, asked once, outside any transaction."""

    inventory: object
    placement: object
    found: list
    kept: object = None


def start_failback(actor, replica_id, options=None, *, plan=None, plan_order=0, **option_fields):
    """Start a failback of one replica in Failover: queue phase 1 (create the production VM, copy the data).

    ``options`` is a ``StartOptions`` (or its fields as keywords). The pre-failback checks
    (checks.before_start) must pass, or an Administrator overrides them with a reason. A production VM
    kept by this replica's last cancelled failback, with the same name, host and datastore, is reused:
    phase 1 then sends only the blocks that differ."""
    action = "start_failback"
    replica = Replica.objects.filter(pk=replica_id).first()
    if replica is None:
        refuse(f"Start failback refused: there is no replica #{replica_id}.", action=action, actor=actor)
    require_operator(actor, action, replica=replica)
    where = {"action": action, "actor": actor, "replica": replica}
    options = _valid_options(options or StartOptions(**option_fields), plan=plan, **where)
    facts = _platform_facts(options, **where)
    _check_target(options, facts, **where)
    _enforce_checks(facts.found, override=options.override_checks, reason=options.reason, **where)
    return _create_session(replica, options, facts, plan=plan, plan_order=plan_order, actor=actor)


def _valid_options(options, *, plan, action, actor, replica):
    """The options checked and normalised, or a refusal that says which one is wrong."""
    where = {"action": action, "actor": actor, "replica": replica}
    reason = clean_reason(options.reason, **where)
    switch_at, after = options.switch_at, options.commit_after_min
    if options.switch_mode not in SwitchMode.values:
        refuse(f"Unknown switch mode {options.switch_mode!r}; choose one of {', '.join(SwitchMode.values)}.", **where)
    if (
        options.switch_mode == SwitchMode.SCHEDULED and plan is None
    ):  # a plan's members follow the plan's (validated) time
        validate_switch_time(switch_at, **where)
    elif options.switch_mode != SwitchMode.SCHEDULED:
        switch_at = None
    policy = options.commit_policy or CommitPolicy.NONE
    if policy not in CommitPolicy.values:
        refuse(f"Unknown commit policy {policy!r}; choose one of {', '.join(CommitPolicy.values)}.", **where)
    if policy == CommitPolicy.NONE:
        after = None
    elif after is None or not 1 <= int(after) <= COMMIT_AFTER_MAX_MIN:
        refuse(f"An automatic commit or undo needs a delay between 1 and {COMMIT_AFTER_MAX_MIN} minutes.", **where)
    vm_name = (options.vm_name or "").strip()
    if not VM_NAME_RE.match(vm_name):
        refuse(
            "The production VM name must be 1-80 letters, digits, dots, dashes or underscores, starting with a letter or digit.",
            **where,
        )
    if options.bandwidth_mbps is not None and not 1 <= int(options.bandwidth_mbps) <= 100_000:
        refuse("The bandwidth limit must be between 1 and 100000 MB/s (or none).", **where)
    return replace(
        options,
        vm_name=vm_name,
        reason=reason,
        switch_at=switch_at,
        commit_policy=policy,
        commit_after_min=after,
        network_map=dict(options.network_map or {}),
        resource_pool=options.resource_pool or "",
        folder=options.folder or "",
        shutdown_timeout_s=options.shutdown_timeout_s or settings.FAILBACK_SHUTDOWN_TIMEOUT,
        power_on_after=bool(options.power_on_after),
    )


def _platform_facts(options, *, action, actor, replica):
    where = {"action": action, "actor": actor, "replica": replica}
    from .hypervisors.registry import hypervisor_for  # the platform is asked outside any transaction

    try:
        with closing(hypervisor_for(replica)) as hv:
            inventory = hv.inventory()
            placement = hv.placement() if (options.resource_pool or options.folder) else None
            found = (
                prechecks.before_start(
                    hv,
                    replica,
                    target_host=options.target_host,
                    target_datastore=options.target_datastore,
                    network_map=options.network_map,
                    inventory=inventory,
                )
                if options.target_host in inventory.hosts
                else []
            )
    except HypervisorError as exc:  # vCenter unreachable, slow or failing: a clear refusal, never a crash
        refuse(f"Start failback refused: {exc}", **where)
    facts = _Facts(inventory, placement, found)
    facts.kept = _kept_vm(replica, options.vm_name, options.target_host, options.target_datastore, inventory)
    if facts.kept is not None:  # its disks are already allocated: the room check counts them as free
        facts.found = [
            c
            if c.key != "datastore"
            else prechecks.Check(
                "datastore",
                c.label,
                prechecks.OK,
                f"Reusing the production VM kept by failback #{facts.kept.pk}: its disks are already on {options.target_datastore}.",
            )
            for c in found
        ]
    return facts


def _check_target(options, facts, *, action, actor, replica):
    """Where the VM goes exists, its name is free, the replica is known and has no failback running."""
    where = {"action": action, "actor": actor, "replica": replica}
    placement, inventory = facts.placement, facts.inventory
    if placement is not None and not (placement.resource_pools or placement.folders):  # the lab has neither
        refuse(
            f"Start failback refused: {replica.name}'s platform has no resource pools or VM folders; leave them empty.",
            **where,
        )
    if options.resource_pool and options.resource_pool not in placement.resource_pools:
        refuse(f"Unknown resource pool {options.resource_pool!r}.", **where)
    if options.folder and options.folder not in placement.folders:
        refuse(f"Unknown folder {options.folder!r}.", **where)
    if options.target_host not in inventory.hosts:
        refuse(f"Unknown target host {options.target_host!r}.", **where)
    if options.target_datastore not in inventory.datastores:
        refuse(f"Unknown target datastore {options.target_datastore!r}.", **where)
    holder = _name_holder(name_scope(replica, options.folder), options.vm_name)
    if holder is not None:  # a rule too: the database's constraint backs it up when the session is created
        refuse(_name_taken(options.vm_name, holder), **where)
    if facts.kept is None and any(vm.name == options.vm_name for vm in inventory.vms):
        refuse(f"A VM named {options.vm_name!r} already exists; pick another name.", **where)
    if not any(vm.vm_id == replica.vm_id for vm in inventory.vms):
        refuse(
            f"Start failback refused: the replica VM {replica.name} ({replica.vm_id}) is not in the platform's inventory.",
            **where,
        )
    active = FailbackSession.objects.filter(replica=replica, status__in=ACTIVE).first()
    if active is not None:  # a rule, not a check: no override
        refuse(
            f"Start failback refused: replica {replica.name} already has failback #{active.pk} ({active.get_status_display()}).",
            **where,
        )
    for target in options.network_map.values():
        if target is not None and target not in inventory.networks:
            refuse(f"Unknown target network {target!r}.", **where)


def _create_session(replica, options, facts, *, plan, plan_order, actor):
    """The session, its disks and its audit row in one transaction; phase 1 queued once it commits."""
    record, scope = options.record(facts.found, facts.kept), name_scope(replica, options.folder)
    message = None
    try:
        with transaction.atomic():
            locked = Replica.objects.select_for_update().get(pk=replica.pk)
            active = FailbackSession.objects.filter(replica=locked, status__in=ACTIVE).first()
            if active is not None:
                message = f"Start failback refused: replica {locked.name} already has failback #{active.pk} ({active.get_status_display()})."
            elif locked.state != ReplicaState.FAILOVER:
                message = f"Start failback refused: replica {locked.name} is {locked.get_state_display()}; failback starts only from Failover."
            else:
                return _new_session(
                    locked, options, facts, scope=scope, record=record, plan=plan, plan_order=plan_order, actor=actor
                )
    except IntegrityError:
        # A partial unique index caught a race the checks could not (another request won).
        holder = _name_holder(scope, options.vm_name)
        message = (
            _name_taken(options.vm_name, holder)
            if holder is not None and holder.replica_id != replica.pk
            else f"Start failback refused: replica {replica.name} already has a failback in progress."
        )
    refuse(message, action="start_failback", actor=actor, replica=replica, data=record)


def _new_session(replica, options, facts, *, scope, record, plan, plan_order, actor):
    kept, o = facts.kept, options
    session = FailbackSession.objects.create(
        replica=replica,
        vm_name=o.vm_name,
        target_host=o.target_host,
        target_datastore=o.target_datastore,
        network_map=o.network_map,
        resource_pool=o.resource_pool,
        folder=o.folder,
        switch_mode=o.switch_mode,
        switch_at=o.switch_at,
        power_on_after=o.power_on_after,
        shutdown_timeout_s=o.shutdown_timeout_s,
        started_by=actor,
        reason=o.reason,
        bandwidth_mbps=o.bandwidth_mbps,
        plan=plan,
        plan_order=plan_order,
        commit_policy=o.commit_policy,
        commit_after_min=o.commit_after_min,
        reused_from=kept,
        production_vm_id=kept.production_vm_id if kept else "",
        name_scope=scope,
        owner_tag=kept.owner_tag if kept else secrets.token_hex(16),
        prediction={"start_checks": [c.as_dict() for c in facts.found]},
    )
    SessionDisk.objects.bulk_create(
        SessionDisk(session=session, key=d.key, capacity_bytes=d.capacity_bytes) for d in replica.disks.all()
    )
    policy = CommitPolicy(o.commit_policy).label.replace("N minutes", f"{o.commit_after_min} min")
    audit(
        action="start_failback",
        actor=actor,
        session=session,
        to_state=SessionStatus.QUEUED,
        detail=f"Failback of {replica.name} to {o.vm_name} on {o.target_host}/{o.target_datastore}; switch {SwitchMode(o.switch_mode).label.lower()}"
        + (f"; {policy}" if o.commit_after_min else "")
        + (f"; reusing the production VM kept by failback #{kept.pk}" if kept else "")
        + (f"; reason: {o.reason}" if o.reason else ""),
        data=record,
    )
    if plan is None:  # a plan queues its members itself, within its concurrency limit
        if o.switch_mode == SwitchMode.SCHEDULED:
            set_switch_schedule(session)
        session.enqueued_at = timezone.now()
        session.save(update_fields=["enqueued_at"])
        enqueue("phase1", session.pk)
    broadcast.session_changed(session.pk)
    return session


def name_scope(replica, folder=""):
    """Where a VM name must be unique: the platform (and vCenter) and the folder."""
    return f"{replica.platform}:{replica.connection_id or ''}:{folder or ''}"


def _name_holder(scope, vm_name):
    return (
        FailbackSession.objects.filter(name_scope=scope, vm_name=vm_name, status__in=ACTIVE)
        .select_related("replica")
        .first()
    )


def _name_taken(vm_name, holder):
    return (
        f"Start failback refused: the name {vm_name!r} is reserved by failback #{holder.pk} of {holder.replica.name} "
        f"({holder.get_status_display()}); pick another name."
    )


def _kept_vm(replica, vm_name, target_host, target_datastore, inventory):
    """The production VM this replica's last cancelled failback kept for a retry, if this start asks for the same one."""
    last = (
        FailbackSession.objects.filter(replica=replica)
        .exclude(status__in=ACTIVE)
        .order_by("-created_at", "-id")
        .first()
    )
    if (
        last is None
        or last.status != SessionStatus.CANCELLED
        or not last.keep_production_vm
        or not last.production_vm_id
        or (last.vm_name, last.target_host, last.target_datastore) != (vm_name, target_host, target_datastore)
    ):
        return None
    return last if any(vm.vm_id == last.production_vm_id for vm in inventory.vms) else None


def _enforce_checks(found, *, actor, override, reason, action, **where):
    """A failed check blocks the action, unless an Administrator overrides it with a reason (audited)."""
    failed = prechecks.failures(found)
    if not failed:
        return
    label = TRANSITIONS["switch"].label if action == "switch" else action.replace("_", " ").capitalize()
    if not override:
        refuse(
            f"{label} refused by the pre-failback checks: {prechecks.summary(found)}.",
            action=action,
            actor=actor,
            data={"checks": [c.as_dict() for c in found]},
            **where,
        )
    if actor is None or not actor.has_perm(OVERRIDE_PERMISSION):
        refuse(
            f"{actor_name(actor)} may not override failed checks: the Administrator role is needed.",
            action=action,
            actor=actor,
            forbidden=True,
            **where,
        )
    if not reason:
        refuse("Overriding a failed check needs a reason.", action=action, actor=actor, **where)
    with transaction.atomic():
        audit(
            action="override_checks",
            outcome=Outcome.INFO,
            actor=actor,
            detail=f"{label} despite failed checks ({prechecks.summary(found)}): {reason}",
            data={"checks": [c.as_dict() for c in found], "reason": reason, "for": action},
            **where,
        )


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
    session = FailbackSession.objects.select_related("replica").filter(pk=session_id).first()
    found = []
    if session is not None and session.status == SessionStatus.READY_TO_SWITCH:
        found = switch_checks(session)
        _enforce_checks(found, actor=actor, override=override_checks, reason=reason, action="switch", session=session)
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
    return transition(
        session_id, "commit", actor=actor, detail=reason, data={"reason": reason}, then=finalise("commit")
    )


def undo(actor, session_id, *, reason=""):
    """Go back to the replica: production off (its changes since the switch discarded), replica on."""
    require_operator(actor, "undo", session=session_id)
    reason = clean_reason(reason, action="undo", actor=actor, session=session_id)
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
    what = "keep the production VM for a retry" if keep else "delete the production VM"
    data = {"reason": reason, "keep_production_vm": keep}
    detail = f"Cancel: {what}{'; reason: ' + reason if reason else ''}"
    status = session.status if session is not None else None
    if status == SessionStatus.QUEUED:
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
    step = "cancel_ready" if status == SessionStatus.READY_TO_SWITCH else "cancel_phase1"

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
