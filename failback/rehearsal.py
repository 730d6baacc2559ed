"""Rehearsing a failback on the embedded lab, again and again: the lab's power controls and its reset.

After a commit the lab replica is Ready and powered off, and only a powered-on replica may be declared in
failover. An Administrator can power a lab VM on or off here (``lab_power``), and ``reset_lab``
(``manage.py seed_lab --reset``) puts the demo lab back as it was seeded. The rules live here; the
replica list and the command only call these functions. Every call writes its audit row, refusals too.

vSphere VMs are powered from vCenter, not from the portal: these controls serve the lab platform only.
"""

from contextlib import closing

from django.db import transaction
from django.utils import timezone

from .audit import actor_name, audit, refuse
from .choices import ACTIVE, AuditAction, ReplicaState
from .hypervisors.base import POWERED_OFF, POWERED_ON, SUSPENDED, HypervisorError
from .hypervisors.registry import Platform, hypervisor_for
from .models import FailbackSession, Replica

# The Administrator role's platform permission (it manages the vCenter connections) also runs the lab.
LAB_PERMISSION = "failback.change_vcenterconnection"
REPLICA_SUFFIX = "_replica"  # the demo lab's replicas are named <workload>_replica
POWER_ACTIONS = {"on": AuditAction.LAB_POWER_ON, "off": AuditAction.LAB_POWER_OFF}


def may_power(actor):
    return actor is not None and actor.has_perm(LAB_PERMISSION)


def power_offer(replica, power):
    """Which power button the replica list shows an Administrator for this replica ('on', 'off' or None):
    a lab replica no failback owns, powered on, off or suspended (power on resumes it). The service checks
    again when the button is pressed."""
    if replica.platform != Platform.LAB or replica.active_session is not None:
        return None
    return {POWERED_OFF: "on", SUSPENDED: "on", POWERED_ON: "off"}.get(power)


def lab_power(actor, replica_id, to, *, reason=""):
    """Power a lab replica's VM on (``to='on'``) or off (``'off'``, at once, like pulling the plug).

    Refused, and audited, for anyone but an Administrator, for a replica on another platform, while a
    failback owns the replica (an active session: its steps power the VMs themselves), and when the VM
    is already in that state."""
    if to not in POWER_ACTIONS:
        raise ValueError(f"to must be 'on' or 'off', not {to!r}")
    action = POWER_ACTIONS[to]
    verb = f"Power {to}"
    replica = _may_power_replica(actor, replica_id, action, verb)
    reason = (reason or "").strip()[:500]
    with closing(hypervisor_for(replica)) as hv:
        before = hv.power_state(replica.vm_id)
        if before == (POWERED_ON if to == "on" else POWERED_OFF):
            refuse(
                f"{verb} refused: {replica.name} ({replica.vm_id}) is already {before}.",
                action=action,
                actor=actor,
                replica=replica,
            )
        try:
            (hv.power_on if to == "on" else hv.power_off)(replica.vm_id)
        except HypervisorError as exc:
            refuse(f"{verb} of {replica.name} failed: {exc}", action=action, actor=actor, replica=replica)
        after = hv.power_state(replica.vm_id)
    audit(
        action=action,
        actor=actor,
        replica=replica,
        detail=f"Lab VM {replica.name} ({replica.vm_id}) powered {to}: {before} → {after}"
        + (f": {reason}" if reason else ""),
        data={"vm_id": replica.vm_id, "before": before, "after": after, "reason": reason},
    )
    return after


def _may_power_replica(actor, replica_id, action, verb):
    """The replica a power button names, or the refusal (audited) that says why it may not be powered."""
    replica = Replica.objects.filter(pk=replica_id).first()
    if replica is None:
        refuse(f"{verb} refused: there is no replica #{replica_id}.", action=action, actor=actor)
    if not may_power(actor):
        refuse(
            f"{actor_name(actor)} may not power lab VMs on or off: the Administrator role is needed.",
            action=action,
            actor=actor,
            replica=replica,
            forbidden=True,
        )
    if replica.platform != Platform.LAB:
        refuse(
            f"{verb} refused: {replica.name} is on {replica.get_platform_display()}; the portal powers lab VMs "
            "only (use vCenter for the others).",
            action=action,
            actor=actor,
            replica=replica,
        )
    owner = FailbackSession.objects.filter(replica=replica, status__in=ACTIVE).first()
    if owner is not None:
        refuse(
            f"{verb} refused: failback #{owner.pk} ({owner.get_status_display()}) owns {replica.name}; "
            "finish, undo or cancel it first.",
            action=action,
            actor=actor,
            replica=replica,
            session=owner,
        )
    return replica


def reset_lab(lab, *, actor=None):
    """Put the demo lab back as ``seed_demo`` left it, so a failback can be rehearsed again.

    In the lab: every VM the seed did not create (production VMs of committed failbacks, VMs a cancel
    kept) is powered off and deleted; every seeded replica is powered on; every host is connected. In the
    portal: each lab replica is in Failover again, protecting its original workload, with no production
    VM recorded. Ended failbacks stay as history (the audit trail refers to them and is never deleted);
    a failback still running on a lab replica refuses the reset, to be finished, undone or cancelled
    first. Returns the summary written to the audit trail."""
    action = AuditAction.RESET_LAB
    seeded = lab.seeded()
    if not seeded:
        refuse(
            f"Reset refused: {lab.where()} holds no seeded demo lab; run manage.py seed_lab first.",
            action=action,
            actor=actor,
        )
    _refuse_while_running(action, actor)
    replica_ids = set(seeded["replicas"])
    deleted, powered_on = _reset_platform(lab, replica_ids)
    with transaction.atomic():
        moved = _reset_replicas(replica_ids, actor)
        kept = FailbackSession.objects.filter(replica__platform=Platform.LAB).count()
        summary = (
            f"Demo lab reset: {len(moved)} replica(s) back in Failover"
            + (f" ({', '.join(moved)})" if moved else "")
            + f"; {len(powered_on)} replica VM(s) powered on"
            + (f" ({', '.join(powered_on)})" if powered_on else "")
            + f"; {len(deleted)} other VM(s) deleted"
            + (f" ({', '.join(deleted)})" if deleted else "")
            + f"; {kept} ended failback(s) kept as history"
        )
        audit(
            action=action,
            actor=actor,
            detail=summary,
            data={"replicas": moved, "powered_on": powered_on, "deleted_vms": deleted, "sessions_kept": kept},
        )
    return summary


def _refuse_while_running(action, actor):
    """A failback still running on a lab replica refuses the reset: it is finished, undone or cancelled first."""
    running = list(
        FailbackSession.objects.filter(replica__platform=Platform.LAB, status__in=ACTIVE)
        .select_related("replica")
        .order_by("pk")
    )
    if running:
        listed = ", ".join(f"#{s.pk} {s.replica.name} ({s.get_status_display()})" for s in running)
        refuse(
            f"Reset refused: failbacks still running on the lab: {listed}. Finish, undo or cancel them first.",
            action=action,
            actor=actor,
            data={"sessions": [s.pk for s in running]},
        )


def _reset_platform(lab, replica_ids):
    """In the lab: delete every VM the seed did not create, power the seeded replicas on, connect every host."""
    deleted, powered_on = [], []
    with lab.exclusive():
        states = lab.power_states()
        for vm in lab.inventory().vms:
            if vm.vm_id in replica_ids:
                if states.get(vm.vm_id) != POWERED_ON:
                    lab.power_on(vm.vm_id)
                    powered_on.append(f"{vm.name} ({vm.vm_id})")
                continue
            if states.get(vm.vm_id) != POWERED_OFF:
                lab.power_off(vm.vm_id)
            lab.delete_vm(vm.vm_id)
            deleted.append(f"{vm.name} ({vm.vm_id} on {vm.host})")
        for host, state in lab.host_states().items():
            if state != "connected":
                lab.set_host_state(host, "connected")
    return deleted, powered_on


def _reset_replicas(replica_ids, actor):
    """In the portal: each lab replica in Failover again, protecting its original workload (one audit row each)."""
    moved = []
    replicas = Replica.objects.select_for_update().filter(platform=Platform.LAB, vm_id__in=replica_ids)
    for replica in replicas.order_by("name"):
        source = replica.name.removesuffix(REPLICA_SUFFIX)
        if replica.state == ReplicaState.FAILOVER and not replica.production_vm_id and replica.source_name == source:
            continue
        Replica.objects.filter(pk=replica.pk).update(
            state=ReplicaState.FAILOVER, production_vm_id="", source_name=source, updated_at=timezone.now()
        )
        moved.append(replica.name)
        audit(
            action=AuditAction.REPLICA_STATE,
            actor=actor,
            replica=replica,
            from_state=replica.state,
            to_state=ReplicaState.FAILOVER,
            detail=f"{replica.name} back in Failover, protecting {source}, by the demo lab's reset"
            + (f" (it was protecting production VM {replica.production_vm_id})" if replica.production_vm_id else ""),
            data={"previous_source": replica.source_name, "previous_production_vm_id": replica.production_vm_id},
        )
    return moved
