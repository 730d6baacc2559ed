"""A lab for the security tests: the demo lab's names and topology, with empty sparse disks.

The security tests never copy a disk, so they skip writing the demo's random data (most of the
`lab` fixture's time); everything else is the real lab hypervisor and the real seed_lab import.
"""

import os
import socket

import pytest
from django.conf import settings
from django.core.management import call_command
from django_q.models import Schedule

from failback.choices import Outcome
from failback.hypervisors.lab import LabHypervisor
from failback.models import AuditEvent, FailbackPlan, FailbackSession, Replica, VCenterConnection

MiB = 2**20
REPLICAS = {  # workload: networks, as in the demo lab
    "app-erp-01": ("dr-net",),
    "db-sql-01": ("dr-net",),
    "web-01": ("dr-dmz",),
    "app-crm-01": ("dr-net", "dr-dmz"),
}


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Users log in with force_login: the hash's strength is not under test, only its time would be."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def closed_port():
    """A local port nothing listens on: a vCenter that answers at once with 'connection refused'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def empty_lab():
    """Build the lab under settings.LAB_ROOT and import its replicas."""
    lab = LabHypervisor(settings.LAB_ROOT)
    for host in ("esx-prod-01", "esx-prod-02", "esx-dr-01", "esx-dr-02"):
        lab.add_host(host)
    for name, size in (("prod-ds-01", 4096 * MiB), ("prod-ds-02", 4096 * MiB), ("dr-ds-01", 8192 * MiB)):
        lab.add_datastore(name, size)
    for net in ("prod-net", "prod-dmz", "dr-net", "dr-dmz"):
        lab.add_network(net)
    for workload, networks in REPLICAS.items():
        lab.create_vm(
            f"{workload}_replica",
            host="esx-dr-01",
            datastore="dr-ds-01",
            disks=[8 * MiB, 4 * MiB],
            networks=networks,
            power_on=True,
            shutdown_seconds=0.2,
        )
    import_replicas()
    return lab


def import_replicas():
    """The real seed_lab import: every *_replica VM of the lab becomes a replica in Failover."""
    call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))


def db_state():
    """Everything an action may change; a refused action leaves all of it as it was."""
    return {
        "sessions": list(
            FailbackSession.objects.order_by("pk").values_list(
                "pk", "status", "switch_mode", "switch_at", "reason", "policy_stopped_at"
            )
        ),
        "replicas": list(Replica.objects.order_by("pk").values_list("pk", "state", "name", "source_name")),
        "plans": list(
            FailbackPlan.objects.order_by("pk").values_list(
                "pk", "name", "switch_mode", "switch_at", "switch_started_at"
            )
        ),
        "connections": list(
            VCenterConnection.objects.order_by("pk").values_list(
                "pk",
                "name",
                "host",
                "port",
                "username",
                "password_encrypted",
                "thumbprint",
                "last_test_at",
                "last_test_result",
            )
        ),
        "schedules": sorted(Schedule.objects.values_list("name", flat=True)),
        "accepted": AuditEvent.objects.exclude(outcome=Outcome.REFUSED).exclude(action="login").count(),
    }
