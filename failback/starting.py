"""Starting a failback: the options, the platform's view of them, the rules, the session.

``start_failback`` is the service layer's entry point (``workflow`` exports it too); the start form, the
API's body and a plan's members each build one ``StartOptions``.
"""

import re
import secrets
from contextlib import closing
from dataclasses import dataclass, field, fields, replace
from datetime import datetime

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import broadcast, hooks
from . import checks as prechecks
from .audit import audit, clean_reason, refuse, require_operator
from .choices import ACTIVE, CommitPolicy, ReplicaState, SessionStatus, SwitchMode
from .hypervisors.base import HypervisorError
from .models import FailbackSession, Replica, SessionDisk
from .schedules import enqueue, set_switch_schedule, validate_switch_time

COMMIT_AFTER_MAX_MIN = 7 * 24 * 60
VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


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
    hooks: dict | None = None  # {point: [hook names]}; None: the allow-list's defaults for the replica

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
    not_reused: str = ""  # why a VM kept for a retry cannot serve this one


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
    prechecks.enforce(facts.found, override=options.override_checks, reason=options.reason, **where)
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
    try:
        chosen = hooks.choose(replica.name, options.hooks)
    except ValueError as exc:  # an unknown point or name, or an allow-list that cannot be read
        refuse(f"Start failback refused: {exc}.", **where)
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
        hooks=chosen,
    )


def _refresh_disks(replica, inventory):
    """The replica's disks as the platform has them now (grown or added since the last inventory sync): the
    room check, the session's disks and the production VM built from the replica must all agree."""
    live = next((vm for vm in inventory.vms if vm.vm_id == replica.vm_id), None)
    if live is not None:
        replica.set_disks(live.disks)


def _platform_facts(options, *, action, actor, replica):
    where = {"action": action, "actor": actor, "replica": replica}
    from .hypervisors.registry import hypervisor_for  # the platform is asked outside any transaction

    try:
        with closing(hypervisor_for(replica)) as hv:
            inventory = hv.inventory()
            _refresh_disks(replica, inventory)
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
    if facts.kept is not None and not _same_disks(facts.kept.production_vm_id, replica.vm_id, inventory):
        facts.not_reused = (
            f" (kept by failback #{facts.kept.pk}, but built with the replica's disks as they were then, which have"
            " changed since: it cannot be reused; delete it first)"
        )
        facts.kept = None
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
    if facts.kept is None and (same := [vm.vm_id for vm in inventory.vms if vm.name == options.vm_name]):
        whose = facts.not_reused or _left_by(name_scope(replica, options.folder), options.vm_name, same)
        refuse(f"A VM named {options.vm_name!r} already exists{whose}; pick another name.", **where)
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
        hooks=o.hooks,
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


def dr_hosts(replica):
    """The DR site's hosts on the replica's platform: those the portal's replicas run on. A failback goes
    back to production, so the start wizard and the plan form do not offer them (their choice fields then
    refuse one that is posted anyway)."""
    return set(
        Replica.objects.filter(platform=replica.platform, connection_id=replica.connection_id)
        .exclude(host="")
        .order_by()
        .values_list("host", flat=True)
        .distinct()
    )


def failback_hosts(replica, inventory):
    """The hosts a failback of this replica may go to, in the platform's order."""
    dr = dr_hosts(replica)
    return [h for h in inventory.hosts if h not in dr]


def review(replica, options):
    """Everything a start with these options will do, as the wizard's review step shows it before it starts."""
    from .templatetags.failback_tags import bandwidth_limit, duration

    o = options
    where = f"{o.target_host} / {o.target_datastore}" + "".join(
        f" · {name} {value}" for name, value in (("resource pool", o.resource_pool), ("folder", o.folder)) if value
    )
    switch = SwitchMode(o.switch_mode).label
    if o.switch_mode == SwitchMode.SCHEDULED and o.switch_at:
        left = duration((o.switch_at - timezone.now()).total_seconds())
        switch += f": {timezone.localtime(o.switch_at):%Y-%m-%d %H:%M %Z} (in {left}; as soon as phase 1 ends if it runs longer)"
    policy = CommitPolicy(o.commit_policy).label
    if o.commit_policy != CommitPolicy.NONE:
        policy = policy.replace("N minutes", f"{o.commit_after_min} min")
    return {
        "facts": [
            ("Replica", f"{replica.name} on {replica.host} ({replica.site}): it keeps running during phase 1"),
            ("Production VM", f"{o.vm_name}, built new on {where}"),
            ("Switch", switch),
            (
                "Power-on",
                f"{o.vm_name} is powered on after the switch"
                if o.power_on_after
                else f"{o.vm_name} stays powered off after the switch",
            ),
            ("After the switch", policy),
            ("Bandwidth limit", bandwidth_limit(o.bandwidth_mbps)),
            ("Disk transport", _transport_fact(replica)),
            ("Hooks", _hooks_fact(replica, o.hooks)),
            ("Reason", o.reason or "—"),
        ],
        "disks": [(d.key, d.capacity_bytes, d.datastore, o.target_datastore) for d in replica.disks.all()],
        "total_bytes": sum(d.capacity_bytes for d in replica.disks.all()),
        "networks": [(source, target or "Disconnected") for source, target in o.network_map.items()],
    }


def _hooks_fact(replica, requested):
    """The hooks the failback will run at each point (chosen, or the allow-list's defaults for the replica)."""
    try:
        chosen = hooks.choose(replica.name, requested)
    except (ValueError, hooks.HookConfigError) as exc:
        return f"refused at the start: {exc}"
    where = "; ".join(f"{hooks.POINTS[p]}: {', '.join(n)}" for p, n in chosen.items() if n)
    return (where or "none") + ("" if requested is not None else " (the allow-list's defaults for this replica)")


def _transport_fact(replica):
    """The transport the disks will move by, and what it sends in phase 1 and in the switch."""
    from django.conf import settings

    from .transports import consequence

    transport = replica.connection.transport if replica.connection_id else settings.LAB_TRANSPORT
    return f"{transport}: {consequence(transport)}"


def name_scope(replica, folder=""):
    """Where a VM name must be unique: the platform (and vCenter) and the folder."""
    return f"{replica.platform}:{replica.connection_id or ''}:{folder or ''}"


def _name_holder(scope, vm_name):
    return (
        FailbackSession.objects.filter(name_scope=scope, vm_name=vm_name, status__in=ACTIVE)
        .select_related("replica")
        .first()
    )


def _left_by(scope, vm_name, vm_ids):
    """Which ended failback built the VM that holds the name, if one did (a failed switch leaves its
    production VM powered off; a committed one serves): the refusal says so, so that the admin knows
    whose VM it is before deciding what to do with it."""
    last = (
        FailbackSession.objects.filter(name_scope=scope, vm_name=vm_name, production_vm_id__in=vm_ids)
        .exclude(status__in=ACTIVE)
        .order_by("-created_at", "-id")
        .first()
    )
    return f" (the production VM of failback #{last.pk}, which is {last.get_status_display()})" if last else ""


def _name_taken(vm_name, holder):
    return (
        f"Start failback refused: the name {vm_name!r} is reserved by failback #{holder.pk} of {holder.replica.name} "
        f"({holder.get_status_display()}); pick another name."
    )


def _same_disks(vm_a, vm_b, inventory):
    disks = {
        vm.vm_id: {(d.key, d.capacity_bytes) for d in vm.disks} for vm in inventory.vms if vm.vm_id in (vm_a, vm_b)
    }
    return disks.get(vm_a) == disks.get(vm_b)


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
