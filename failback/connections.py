"""vCenter connections: registration, Test connection, thumbprint pinning, inventory sync and replica
discovery. Business rules for connections live here (views and tasks only call these functions).
Passwords never appear in audit rows, logs, pages or exceptions raised from here."""

import dataclasses
import logging
from contextlib import closing

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_q.models import Schedule
from django_q.tasks import async_task

from .choices import Outcome, ReplicaState
from .credentials import CredentialError
from .hypervisors.base import HypervisorError
from .hypervisors.registry import for_connection
from .models import Replica, VCenterConnection
from .workflow import Refused, audit, refuse

log = logging.getLogger(__name__)

MANAGE_PERMISSION = "failback.change_vcenterconnection"
VIEW_PERMISSION = "failback.view_vcenterconnection"
WAITING_FOR_TEST = "the scheduled sync starts once Test connection succeeds."
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


def may_view(actor):
    """Connections (their hosts, accounts and inventories) are shown to Administrators only."""
    return actor is not None and actor.has_perm(VIEW_PERMISSION)


def require_admin(actor, action, connection=None):
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


def normalise_thumbprint(value):
    """'aa-bb-…' or 'AA:BB:…' as 'AA:BB:…'; ValueError unless it is 32 hexadecimal bytes (SHA-256)."""
    value = (value or "").strip().upper().replace("-", ":")
    parts = value.split(":")
    if len(parts) != 32 or any(len(b) != 2 or any(c not in "0123456789ABCDEF" for c in b) for b in parts):
        raise ValueError("A SHA-256 thumbprint is 32 hexadecimal bytes separated by colons.")
    return value


@dataclasses.dataclass(frozen=True)
class LoginCheck:
    """What a save found when it logged in: ``verified`` (and vCenter's version), or why it could not tell."""

    verified: bool
    result: str


def _check_login(actor, action, connection):
    """Log in with what is about to be saved. The server answering "wrong password", or presenting another
    certificate than the pinned one, refuses the save (a connection that can never work is not stored to
    fail its sync every few minutes). A server that cannot be reached, or whose certificate is not trusted
    yet (pin it next), does not: the connection is saved unverified, and its scheduled sync waits for a
    successful Test connection."""
    from .hypervisors.vsphere import fetch_thumbprint as probe

    where = {"action": action, "actor": actor, "data": {"connection": connection.name}}
    try:
        presented = probe(connection.host, connection.port, timeout=settings.FAILBACK_VSPHERE_TIMEOUT)
    except (OSError, HypervisorError) as exc:
        return LoginCheck(False, f"Failed: {exc}")
    pinned = connection.thumbprint.strip().upper().replace("-", ":")
    if connection.tls_mode == VCenterConnection.TLS.THUMBPRINT and presented != pinned:
        refuse(
            f"{connection.host}:{connection.port} presents the SHA-256 thumbprint {presented}, not the pinned "
            f"{connection.thumbprint}; the connection is not saved. If its certificate was replaced on purpose, "
            "check the new thumbprint with vCenter and pin it.",
            **where,
        )
    try:
        with closing(for_connection(connection)) as hv:
            return LoginCheck(True, f"Connected: {hv.about()}")
    except CredentialError as exc:
        refuse(str(exc), **where)
    except HypervisorError as exc:
        if getattr(exc, "fault", "") == "InvalidLogin":
            refuse(f"{exc}; the connection is not saved. Check the user name and the password.", **where)
        return LoginCheck(False, f"Failed: {exc}")


def save_connection(actor, connection, *, password=None):
    """Create or update a connection (the form has validated the fields). A blank password keeps the old one.

    The save logs in first (``_check_login``): wrong credentials or a wrong pin are refused and nothing is
    stored; an unreachable or not yet trusted server is saved unverified, without its scheduled sync."""
    action = "update_connection" if connection.pk else "create_connection"
    require_admin(actor, action, connection)
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
    check = _check_login(actor, action, connection)
    before = _public(VCenterConnection.objects.get(pk=connection.pk)) if connection.pk else None
    # Why there is no scheduled sync shows where sync failures do (the Test connection's fields stay the button's).
    connection.sync_error = "" if check.verified else f"Not verified when saved ({check.result}); {WAITING_FOR_TEST}"
    with transaction.atomic():
        connection.save()
        _sync_schedule(connection, enabled=check.verified)
        audit(
            action=action,
            actor=actor,
            detail=f"vCenter connection {connection.name} ({connection.host}:{connection.port}) saved"
            + ("; password changed" if password and before else "")
            + (f"; {check.result}" if check.verified else f"; not verified ({check.result}): {WAITING_FOR_TEST}"),
            data={
                "connection": connection.name,
                "before": before,
                "after": _public(connection),
                "password_changed": bool(password),
                "verified": check.verified,
            },
        )
    return connection


def pin_thumbprint(actor, connection_id, thumbprint):
    """Pin the SHA-256 thumbprint the administrator compared with vCenter's (an update of the connection:
    the save logs in through the pin, so a thumbprint the server does not present is refused)."""
    connection = VCenterConnection.objects.get(pk=connection_id)
    require_admin(actor, "update_connection", connection)
    try:
        connection.thumbprint = normalise_thumbprint(thumbprint)
    except ValueError as exc:
        refuse(f"Pin refused: {exc}", action="update_connection", actor=actor, data={"connection": connection.name})
    connection.tls_mode = VCenterConnection.TLS.THUMBPRINT
    return save_connection(actor, connection)


def sync_scheduled(connection):
    return Schedule.objects.filter(name=f"vcenter-sync-{connection.pk}").exists()


def _sync_schedule(connection, *, enabled=True):
    """The connection's periodic inventory sync: kept while its login works, removed while it cannot."""
    if not enabled:
        Schedule.objects.filter(name=f"vcenter-sync-{connection.pk}").delete()
        return
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

    require_admin(actor, "fetch_thumbprint", connection)
    try:
        thumbprint = probe(connection.host, connection.port, timeout=settings.FAILBACK_VSPHERE_TIMEOUT)
    except (OSError, HypervisorError) as exc:
        refuse(
            f"Could not reach {connection.host}:{connection.port}: {exc}",
            action="fetch_thumbprint",
            actor=actor,
            data={"connection": connection.name},
        )
    pinned = connection.tls_mode == VCenterConnection.TLS.THUMBPRINT and connection.thumbprint == thumbprint
    audit(
        action="fetch_thumbprint",
        actor=actor,
        detail=f"{connection.name}: {connection.host}:{connection.port} presents the SHA-256 thumbprint {thumbprint}"
        + (" (the pinned one)" if pinned else ""),
        data={"connection": connection.name, "thumbprint": thumbprint, "pinned": pinned},
    )
    return thumbprint


def test_connection(actor, connection_id):
    """Log in and report the vCenter version, or the exact error. Audited either way."""
    connection = VCenterConnection.objects.get(pk=connection_id)
    require_admin(actor, "test_connection", connection)
    try:
        with closing(for_connection(connection)) as hv:
            result, outcome = f"Connected: {hv.about()}", Outcome.OK
    except Exception as exc:  # the message is the platform's own, shown to the administrator as is
        result, outcome = f"Failed: {exc}", Outcome.FAILED
    with transaction.atomic():
        VCenterConnection.objects.filter(pk=connection.pk).update(last_test_at=timezone.now(), last_test_result=result)
        if outcome == Outcome.OK:
            _sync_schedule(connection)  # saved unverified, or paused by a refused login: it works now
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
        refused_login = isinstance(exc, CredentialError) or getattr(exc, "fault", "") == "InvalidLogin"
        if refused_login:  # retrying every few minutes cannot help: wait for the administrator
            exc = f"{exc}; {WAITING_FOR_TEST}"
        with transaction.atomic():
            if refused_login:
                _sync_schedule(connection, enabled=False)
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
        known = {r.vm_id: r for r in Replica.objects.filter(connection=connection).prefetch_related("disks")}
        resized = 0
        for vm in inventory.vms:
            if vm.vm_id in known:  # its disks as vCenter has them now (grown or added since the last sync)
                resized += known[vm.vm_id].set_disks(vm.disks)
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
            f"{len(inventory.datastores)} datastores; {found} new replica(s) found"
            + (f"; disks changed on {resized} replica(s)" if resized else ""),
            data={"connection": connection.name, "new_replicas": found, "disks_changed": resized},
        )
    return found


def request_sync(actor, connection_id):
    """Queue an inventory sync for a worker (the same task the schedule runs)."""
    connection = VCenterConnection.objects.get(pk=connection_id)
    require_admin(actor, "sync_inventory", connection)
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
    replica.set_disks(vm.disks)
    return replica


def pair_replica(actor, connection_id, vm_id, source_name):
    """Manual pairing: this VM is the replica of that source workload."""
    connection = VCenterConnection.objects.get(pk=connection_id)
    require_admin(actor, "pair_replica", connection)
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
    "may_view",
    "require_admin",
    "normalise_thumbprint",
    "save_connection",
    "pin_thumbprint",
    "sync_scheduled",
    "fetch_thumbprint",
    "test_connection",
    "request_sync",
    "sync_inventory",
    "pair_replica",
]
