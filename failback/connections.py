"""vCenter connections: registration, Test connection, thumbprint pinning, inventory sync and replica
discovery. Business rules for connections live here (views and tasks only call these functions).
Passwords never appear in audit rows, logs, pages or exceptions raised from here."""

import dataclasses
import logging
from contextlib import closing

from django.db import transaction
from django.utils import timezone
from django_q.models import Schedule
from django_q.tasks import async_task

from .choices import Outcome, ReplicaState
from .credentials import CredentialError
from .hypervisors.base import HypervisorError
from .hypervisors.registry import for_connection
from .models import Replica, ReplicaDisk, VCenterConnection
from .workflow import Refused, audit, refuse

log = logging.getLogger(__name__)

MANAGE_PERMISSION = "failback.change_vcenterconnection"
PUBLIC_FIELDS = [
    "name",
    "host",
    "port",
    "username",
    "tls_mode",
    "thumbprint",
    "transport",
    "datastore_paths",
    "replica_suffix",
    "replica_attribute",
    "sync_minutes",
]


def _require_admin(actor, action, connection=None):
    if actor is None or not actor.has_perm(MANAGE_PERMISSION):
        refuse(
            f"{actor.get_username() if actor else 'system'} may not manage vCenter connections: the Administrator role is needed.",
            action=action,
            actor=actor,
            data={"connection": getattr(connection, "name", None)},
            forbidden=True,
        )


def _public(connection):
    return {f: getattr(connection, f) for f in PUBLIC_FIELDS}


def save_connection(actor, connection, *, password=None):
    """Create or update a connection (the form has validated the fields). A blank password keeps the old one."""
    action = "update_connection" if connection.pk else "create_connection"
    _require_admin(actor, action, connection)
    if connection.tls_mode == VCenterConnection.TLS.THUMBPRINT and not connection.thumbprint:
        refuse(
            "Pinning needs the server's SHA-256 thumbprint: fetch it and confirm it first.",
            action=action,
            actor=actor,
            data={"connection": connection.name},
        )
    if password:
        connection.set_password(password)
    elif not connection.password_encrypted:
        refuse(
            "A password is needed for a new connection.",
            action=action,
            actor=actor,
            data={"connection": connection.name},
        )
    before = _public(VCenterConnection.objects.get(pk=connection.pk)) if connection.pk else None
    with transaction.atomic():
        connection.save()
        _sync_schedule(connection)
        audit(
            action=action,
            actor=actor,
            detail=f"vCenter connection {connection.name} ({connection.host}:{connection.port}) saved"
            + ("; password changed" if password and before else ""),
            data={
                "connection": connection.name,
                "before": before,
                "after": _public(connection),
                "password_changed": bool(password),
            },
        )
    return connection


def _sync_schedule(connection):
    Schedule.objects.update_or_create(
        name=f"vcenter-sync-{connection.pk}",
        defaults={
            "func": "failback.tasks.sync_inventory",
            "args": str(connection.pk),
            "schedule_type": Schedule.MINUTES,
            "minutes": connection.sync_minutes,
            "repeats": -1,
            "next_run": timezone.now(),
        },
    )


def fetch_thumbprint(actor, connection):
    """What the server presents now, for the administrator to compare and pin."""
    from .hypervisors.vsphere import fetch_thumbprint as probe

    _require_admin(actor, "fetch_thumbprint", connection)
    try:
        return probe(connection.host, connection.port)
    except (OSError, HypervisorError) as exc:
        refuse(
            f"Could not reach {connection.host}:{connection.port}: {exc}",
            action="fetch_thumbprint",
            actor=actor,
            data={"connection": connection.name},
        )


def test_connection(actor, connection_id):
    """Log in and report the vCenter version, or the exact error. Audited either way."""
    connection = VCenterConnection.objects.get(pk=connection_id)
    _require_admin(actor, "test_connection", connection)
    try:
        with closing(for_connection(connection)) as hv:
            result, outcome = f"Connected: {hv.about()}", Outcome.OK
    except Exception as exc:  # the message is the platform's own, shown to the administrator as is
        result, outcome = f"Failed: {exc}", Outcome.FAILED
    with transaction.atomic():
        VCenterConnection.objects.filter(pk=connection.pk).update(last_test_at=timezone.now(), last_test_result=result)
        audit(
            action="test_connection",
            actor=actor,
            outcome=outcome,
            detail=f"{connection.name}: {result}",
            data={"connection": connection.name},
        )
    return outcome == Outcome.OK, result


def sync_inventory(connection_id, actor=None):
    """Fetch the inventory (one round trip per object type) and discover replicas by the naming rule."""
    connection = VCenterConnection.objects.get(pk=connection_id)
    try:
        with closing(for_connection(connection)) as hv:
            inventory = hv.inventory()
            by_attribute = (
                hv.custom_attribute_values(connection.replica_attribute) if connection.replica_attribute else {}
            )
    except Exception as exc:
        with transaction.atomic():
            VCenterConnection.objects.filter(pk=connection.pk).update(sync_error=str(exc))
            audit(
                action="sync_inventory",
                actor=actor,
                outcome=Outcome.FAILED,
                detail=f"{connection.name}: {exc}",
                data={"connection": connection.name},
            )
        return 0
    snapshot = dataclasses.asdict(inventory)
    found = 0
    with transaction.atomic():
        VCenterConnection.objects.filter(pk=connection.pk).update(
            inventory=snapshot, synced_at=timezone.now(), sync_error=""
        )
        suffix = connection.replica_suffix
        known = set(Replica.objects.filter(connection=connection).values_list("vm_id", flat=True))
        for vm in inventory.vms:
            if vm.vm_id in known:
                continue
            if vm.vm_id in by_attribute:  # the custom attribute names the source workload
                source = by_attribute[vm.vm_id]
            elif suffix and vm.name.endswith(suffix):
                source = vm.name.removesuffix(suffix)
            else:
                continue
            _add_replica(connection, vm, source_name=source)
            found += 1
        audit(
            action="sync_inventory",
            actor=actor,
            detail=f"{connection.name}: {len(inventory.vms)} VMs, {len(inventory.hosts)} hosts, "
            f"{len(inventory.datastores)} datastores; {found} new replica(s) found",
            data={"connection": connection.name, "new_replicas": found},
        )
    return found


def request_sync(actor, connection_id):
    """Queue an inventory sync for a worker (the same task the schedule runs)."""
    connection = VCenterConnection.objects.get(pk=connection_id)
    _require_admin(actor, "sync_inventory", connection)
    with transaction.atomic():
        audit(
            action="sync_inventory",
            actor=actor,
            outcome=Outcome.INFO,
            detail=f"{connection.name}: inventory sync requested",
            data={"connection": connection.name},
        )
        transaction.on_commit(
            lambda: async_task(
                "failback.tasks.sync_inventory",
                connection.pk,
                task_name=f"sync-{connection.pk}-{timezone.now():%H%M%S%f}",
            )
        )


def _add_replica(connection, vm, *, source_name):
    # A discovered replica is in normal replication (Ready) until an operator declares the failover.
    replica = Replica.objects.create(
        name=vm.name,
        source_name=source_name,
        platform="vsphere",
        connection=connection,
        vm_id=vm.vm_id,
        host=vm.host,
        site=connection.name,
        state=ReplicaState.READY,
    )
    ReplicaDisk.objects.bulk_create(
        ReplicaDisk(replica=replica, key=d.key, capacity_bytes=d.capacity_bytes, datastore=d.datastore)
        for d in vm.disks
    )
    return replica


def pair_replica(actor, connection_id, vm_id, source_name):
    """Manual pairing: this VM is the replica of that source workload."""
    connection = VCenterConnection.objects.get(pk=connection_id)
    _require_admin(actor, "pair_replica", connection)
    source_name = (source_name or "").strip()
    if not source_name or len(source_name) > 200:
        refuse(
            "Name the source workload (1-200 characters).",
            action="pair_replica",
            actor=actor,
            data={"connection": connection.name},
        )
    try:
        with closing(for_connection(connection)) as hv:
            vm = next((v for v in hv.inventory().vms if v.vm_id == vm_id), None)
    except (HypervisorError, CredentialError) as exc:  # vCenter down or the key changed: say so, do not crash
        refuse(f"Pair replica refused: {exc}", action="pair_replica", actor=actor, data={"connection": connection.name})
    if vm is None:
        refuse(
            f"There is no VM {vm_id!r} on {connection.name}.",
            action="pair_replica",
            actor=actor,
            data={"connection": connection.name},
        )
    if (
        Replica.objects.filter(connection=connection, vm_id=vm_id).exists()
        or Replica.objects.filter(name=vm.name).exists()
    ):
        refuse(
            f"{vm.name} is already a replica.", action="pair_replica", actor=actor, data={"connection": connection.name}
        )
    with transaction.atomic():
        replica = _add_replica(connection, vm, source_name=source_name)
        audit(
            action="pair_replica",
            actor=actor,
            replica=replica,
            detail=f"{vm.name} paired as the replica of {source_name}",
            data={"connection": connection.name, "vm_id": vm_id},
        )
    return replica


__all__ = [
    "Refused",
    "save_connection",
    "fetch_thumbprint",
    "test_connection",
    "request_sync",
    "sync_inventory",
    "pair_replica",
]
