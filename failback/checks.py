"""Pre-failback checks: shown in the start form's summary, run again just before the switch.

Each check says what it looked at and what it found. A failed blocking check stops the action
(``workflow`` refuses it) unless an Administrator overrides it with a reason, which is audited; a
check whose override would lose data (``overridable=False``) cannot be overridden.
A warning is shown but does not block. Nothing here changes anything.
"""

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from .audit import OVERRIDE_PERMISSION, actor_name, audit, refuse
from .choices import TRANSITIONS, Outcome
from .hypervisors.base import POWERED_ON, NotFound

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    key: str
    label: str
    status: str  # ok | warn | fail
    detail: str
    overridable: bool = True

    @property
    def failed(self):
        return self.status == FAIL

    def as_dict(self):
        return asdict(self)


def _db_now():
    with connection.cursor() as cursor:
        cursor.execute("SELECT CURRENT_TIMESTAMP")
        value = cursor.fetchone()[0]
    if isinstance(value, str):  # SQLite: 'YYYY-MM-DD HH:MM:SS' in UTC
        value = datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return value


def record_scheduler_clock(name="dr_portal"):
    """Called by the watchdog in the worker: its clock beside the database's."""
    from django.db.models.functions import Now

    from .models import SchedulerClock

    now = timezone.now()
    if not SchedulerClock.objects.filter(pk=name).update(worker_time=now, db_time=Now()):
        SchedulerClock.objects.create(name=name, worker_time=now, db_time=_db_now())


def scheduler_clock():
    """How far the scheduler's clock is from this process's (seconds), and when it was last seen."""
    from .models import SchedulerClock

    clock = SchedulerClock.objects.order_by("-db_time").first()
    db_now = _db_now()
    here_skew = (timezone.now() - db_now).total_seconds()
    if clock is None:
        return Check(
            "scheduler_clock",
            "Scheduler running, clocks agree",
            WARN,
            "No scheduler has reported yet: scheduled switches, commit policies and the watchdog need a running worker (manage.py qcluster).",
        )
    silent = (db_now - clock.db_time).total_seconds()
    skew = clock.skew_s - here_skew
    limit = settings.FAILBACK_MAX_CLOCK_SKEW_S
    if abs(skew) > limit:
        return Check(
            "scheduler_clock",
            "Scheduler running, clocks agree",
            FAIL,
            f"The scheduler's clock is {skew:+.0f} s off this server's (at most ±{limit} s allowed): a scheduled switch would run at the wrong time.",
        )
    if silent > 180:
        return Check(
            "scheduler_clock",
            "Scheduler running, clocks agree",
            WARN,
            f"No scheduler seen for {silent / 60:.0f} min: scheduled switches and commit policies wait until a worker runs.",
        )
    return Check(
        "scheduler_clock",
        "Scheduler running, clocks agree",
        OK,
        f"Scheduler seen {silent:.0f} s ago; clock skew {skew:+.1f} s (limit ±{limit} s).",
    )


def _host(hv, host):
    states = hv.host_states()
    state = states.get(host, "missing" if states else "connected")
    label = "Target host reachable, not in maintenance"
    if state == "connected":
        return Check("host", label, OK, f"{host} is connected.")
    if state == "maintenance":
        return Check("host", label, FAIL, f"{host} is in maintenance mode.")
    if state == "missing":
        return Check("host", label, FAIL, f"{host} is not in the inventory.")
    return Check("host", label, FAIL, f"{host} is {state}.")


def _replica_power(hv, replica):
    state = hv.power_state(replica.vm_id)
    if state == POWERED_ON:
        return Check("replica_power", "Replica powered on", OK, f"{replica.name} is powered on and serving.")
    return Check(
        "replica_power",
        "Replica powered on",
        FAIL,
        f"{replica.name} is {state}: a failback copies from a running replica.",
    )


def before_start(hv, replica, *, target_host, target_datastore, network_map, inventory=None):
    """What the start form's summary shows and start_failback enforces."""
    from .choices import ACTIVE

    inventory = inventory or hv.inventory()
    other = replica.sessions.filter(status__in=ACTIVE).first()
    return [
        _host(hv, target_host),
        _room(replica, inventory, target_datastore),
        _networks(replica, inventory, network_map or {}),
        _replica_power(hv, replica),
        Check(
            "no_other_session",
            "No other failback on this replica",
            FAIL if other else OK,
            f"Failback #{other.pk} is {other.get_status_display()}." if other else "None in progress.",
        ),
        scheduler_clock(),
    ]


def _room(replica, inventory, datastore):
    label = "Datastore room for the disks"
    needed = sum(d.capacity_bytes for d in replica.disks.all())
    free = inventory.datastores.get(datastore)
    if free is None:
        return Check("datastore", label, FAIL, f"{datastore} is not in the inventory (or not accessible).")
    said = f"{datastore} has {free / 2**30:.1f} GiB free; the disks need {needed / 2**30:.1f} GiB."
    return Check("datastore", label, FAIL if free < needed else OK, said)


def _networks(replica, inventory, network_map):
    config = next((vm for vm in inventory.vms if vm.vm_id == replica.vm_id), None)
    sources = sorted({nic.network for nic in config.nics if nic.network}) if config else []
    unmapped = [n for n in sources if n not in network_map]
    if unmapped:
        return Check(
            "networks",
            "Networks mapped",
            FAIL,
            f"{', '.join(unmapped)} not mapped to a target network (or to disconnected).",
        )
    shown = ", ".join(f"{s} → {network_map.get(s) or 'disconnected'}" for s in sources) or "the replica has no network"
    return Check("networks", "Networks mapped", OK, shown)


def before_switch(hv, session):
    """Run again just before phase 2: the world may have changed since the start."""
    inventory = hv.inventory()
    checks = [_host(hv, session.target_host)]
    if session.target_datastore in inventory.datastores:
        checks.append(
            Check("datastore", "Target datastore accessible", OK, f"{session.target_datastore} is accessible.")
        )
    else:
        checks.append(
            Check("datastore", "Target datastore accessible", FAIL, f"{session.target_datastore} is not accessible.")
        )
    checks.append(_replica_power(hv, session.replica))
    checks.append(replica_disks(hv, session))
    checks.append(_production_vm(hv, session))
    checks.append(scheduler_clock())
    return checks


def disk_changes(hv, session):
    """How the replica's disks differ from those the failback started with (and built the production VM
    for), one phrase a disk; empty when they are the same."""
    from .templatetags.failback_tags import binary_size

    now = {d.key: d.capacity_bytes for d in hv.vm_config(session.replica.vm_id).disks}
    was = {d.key: d.capacity_bytes for d in session.disks.all()}
    changes = []
    for key in sorted(was.keys() | now.keys()):
        if key not in now:
            changes.append(f"disk {key} ({binary_size(was[key])}) was removed")
        elif key not in was:
            changes.append(f"disk {key} ({binary_size(now[key])}) was added")
        elif now[key] != was[key]:
            verb = "grew" if now[key] > was[key] else "shrank"
            changes.append(f"disk {key} {verb} from {binary_size(was[key])} to {binary_size(now[key])}")
    if session.production_vm_id:  # built (or kept) from the replica as it was: it must hold every disk in full
        try:
            built = {d.key: d.capacity_bytes for d in hv.vm_config(session.production_vm_id).disks}
        except NotFound:
            built = None  # the production VM's own check says it is gone
        for key in sorted(was) if built is not None else ():
            if built.get(key) != was[key]:
                has = binary_size(built[key]) if key in built else "no such disk"
                changes.append(f"the production VM's disk {key} is {has}, not {binary_size(was[key])}")
    return changes


def replica_disks(hv, session):
    """The production VM has the replica's disks as they were when the failback started, and only those
    are copied: a disk grown, added or removed since would be lost by a switch, so no override is offered."""
    label = "Replica disks unchanged since the start"
    try:
        changes = disk_changes(hv, session)
    except NotFound:
        return Check("replica_disks", label, FAIL, f"Replica {session.replica.name} no longer exists.", False)
    if not changes:
        return Check(
            "replica_disks", label, OK, f"{session.disks.count()} disk(s) as when failback #{session.pk} started."
        )
    return Check(
        "replica_disks",
        label,
        FAIL,
        f"Since failback #{session.pk} started, {'; '.join(changes)}. The production VM was built with the "
        "disks as they were, so a switch would lose data: cancel this failback and start a new one",
        False,
    )


def _production_vm(hv, session):
    """The VM the switch will hand the workload to must be there, and be the one this failback created."""
    label = "Production VM is this failback's"
    vm_id = session.production_vm_id
    if not vm_id:
        return Check("production_vm", label, FAIL, f"No production VM was recorded for failback #{session.pk}.")
    try:
        owner = hv.vm_owner(vm_id)
    except NotFound:
        return Check("production_vm", label, FAIL, f"Production VM {session.vm_name} ({vm_id}) no longer exists.")
    if session.owner_tag and owner != session.owner_tag:
        return Check(
            "production_vm",
            label,
            FAIL,
            f"VM {vm_id} is not the one failback #{session.pk} created (owner tag differs).",
        )
    return Check("production_vm", label, OK, f"{session.vm_name} ({vm_id}) was created by this failback.")


def failures(checks):
    return [c for c in checks if c.failed]


def summary(checks):
    return "; ".join(f"{c.label}: {c.detail.rstrip('.')}" for c in failures(checks))


def enforce(found, *, actor, override, reason, action, **where):
    """A failed check blocks the action, unless an Administrator overrides it with a reason (audited)."""
    failed = failures(found)
    if not failed:
        return
    label = TRANSITIONS["switch"].label if action == "switch" else action.replace("_", " ").capitalize()
    binding = [c for c in failed if not c.overridable]
    if override and binding:
        refuse(
            f"{label} refused: {summary(binding)}. This check cannot be overridden.",
            action=action,
            actor=actor,
            data={"checks": [c.as_dict() for c in found]},
            **where,
        )
    if not override:
        refuse(
            f"{label} refused by the pre-failback checks: {summary(found)}.",
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
            detail=f"{label} despite failed checks ({summary(found)}): {reason}",
            data={"checks": [c.as_dict() for c in found], "reason": reason, "for": action},
            **where,
        )
