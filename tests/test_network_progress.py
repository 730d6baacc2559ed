"""Phase 1 over the network transport (the datastore HTTP interface, on vcsim) reports its progress while
the disk streams, as the direct path does, keeps to the session's bandwidth limit, and stops on cancel."""

import filecmp
import random
import threading
import time

import pytest
from django.db import connections as db_connections

from failback import connections, workflow
from failback.choices import SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_ON
from failback.models import AuditEvent, FailbackSession, Replica, SessionDisk, VCenterConnection

from .test_vsphere_vcsim import resize_disk

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

MiB = 1 << 20
CAPACITY = 64 * MiB


@pytest.fixture
def replica(vcsim, admin_user, operator):
    """A powered-on replica on vcsim holding data, its connection on the network transport, in Failover."""
    conn = VCenterConnection(
        name="vcsim",
        host=vcsim.host,
        port=vcsim.port,
        username=vcsim.user,
        tls_mode=VCenterConnection.TLS.THUMBPRINT,
        thumbprint=vcsim.thumbprint,
        transport=VCenterConnection.Transport.NETWORK,
    )
    conn = connections.save_connection(admin_user, conn, password=vcsim.password)
    hv = vcsim.hypervisor()
    source = next(vm for vm in hv.inventory().vms if vm.name == "DC0_H0_VM0")
    vm_id = hv.create_vm_like(
        source.vm_id,
        name="web-01_replica",
        host="DC0_H0",
        datastore="LocalDS_0",
        network_map={"DC0_DVPG0": "DC0_DVPG0"},
    )
    resize_disk(hv, vm_id, "scsi0:0", CAPACITY)
    rng = random.Random(1)
    path = vcsim.hypervisor(transport="direct").disk_path(vm_id, "scsi0:0")  # the guest's data, written locally
    with open(path, "r+b") as fh:
        for _ in range(12):
            fh.seek(rng.randrange(0, CAPACITY - MiB))
            fh.write(rng.randbytes(MiB))
    hv.power_on(vm_id)
    hv.close()
    assert connections.sync_inventory(conn.pk) == 1
    replica = Replica.objects.get(name="web-01_replica")
    return workflow.declare_failover(operator, replica.pk, reason="site A lost")


def start(operator, replica, **kw):
    options = dict(
        vm_name="web-01",
        target_host="DC0_C0_H1",
        target_datastore="LocalDS_0",
        network_map={"DC0_DVPG0": "VM Network"},
        switch_mode=SwitchMode.MANUAL,
        power_on_after=True,
    )
    options.update(kw)
    return workflow.start_failback(operator, replica.pk, **options)


class Watcher:
    """Reads the replica's session disk rows from another database connection while phase 1 runs, as the
    session page does; ``then(row)`` may act on what it sees (e.g. press Cancel)."""

    def __init__(self, replica, then=None):
        self.replica, self.then = replica, then
        self.seen = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch)

    def watch(self):
        try:
            while not self.stop.is_set():
                row = (
                    SessionDisk.objects.filter(session__replica=self.replica, phase=1)
                    .values("bytes_done", "bytes_total", "bytes_written", "rate_bps", "eta_s", "session_id")
                    .first()
                )
                if row is not None:
                    self.seen.append(row)
                    if self.then is not None:
                        self.then(row)
                time.sleep(0.02)
        finally:
            db_connections.close_all()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.vcsim
def test_it_reports_increasing_progress_while_a_disk_streams_over_the_network(vcsim, replica, operator):
    limit_mbps = 16  # megabytes per second: the 64 MiB disk takes about 4.2 s
    with Watcher(replica) as watcher:
        session = start(operator, replica, bandwidth_mbps=limit_mbps)  # phase 1 runs inline
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    during = [row for row in watcher.seen if 0 < row["bytes_done"] < CAPACITY]
    done = [row["bytes_done"] for row in during]
    assert len(set(done)) >= 5, watcher.seen  # several distinct values before the end...
    assert done == sorted(done)  # ...never going back
    assert all(row["bytes_total"] == CAPACITY and row["bytes_written"] == row["bytes_done"] for row in during)
    assert any(row["rate_bps"] > 0 and row["eta_s"] is not None for row in during)  # rate and time left, as direct
    assert watcher.seen[-1]["bytes_done"] == CAPACITY
    # The limit held (measured from the recorded timings) and is in the audit row.
    assert session.phase1_duration.total_seconds() >= 0.9 * CAPACITY / (limit_mbps * 1e6)
    row = AuditEvent.objects.get(session=session, action="copy_disk")
    assert row.data["transport"] == "network" and row.data["bytes_written"] == CAPACITY
    assert row.data["limit_held_s"] > 0
    # The predictions start from the rate the network sustained while working, not the limited one.
    base = session.prediction["base"]
    assert base["limit_held_s"] > 0 and base["write_bps"] > limit_mbps * 1e6
    hv = vcsim.hypervisor(transport="direct")
    assert filecmp.cmp(
        hv.disk_path(replica.vm_id, "scsi0:0"), hv.disk_path(session.production_vm_id, "scsi0:0"), shallow=False
    )
    hv.close()


@pytest.mark.vcsim
def test_it_stops_a_network_stream_at_its_next_chunk_when_cancelled(vcsim, replica, operator):
    pressed = []

    def cancel_half_way(row):
        if not pressed and row["bytes_done"] >= CAPACITY // 4:
            pressed.append(row["bytes_done"])
            workflow.cancel(operator, row["session_id"])

    with Watcher(replica, then=cancel_half_way) as watcher:
        session = start(operator, replica, bandwidth_mbps=16)
    session = FailbackSession.objects.get(pk=session.pk)
    assert pressed and session.status == SessionStatus.CANCELLED, (session.status, session.error)
    assert max(row["bytes_done"] for row in watcher.seen) < CAPACITY  # the stream stopped before the disk's end
    assert not AuditEvent.objects.filter(session=session, action="copy_disk").exists()
    hv = vcsim.hypervisor()
    assert session.production_vm_id not in {vm.vm_id for vm in hv.inventory().vms}  # the cancel step deleted it
    assert hv.power_state(replica.vm_id) == POWERED_ON  # the replica was never touched
    hv.close()


@pytest.mark.vcsim
def test_it_calls_progress_after_each_chunk_on_vsphere(vcsim, replica):
    hv = vcsim.hypervisor(transport="network")
    target = hv.create_vm_like(
        replica.vm_id, name="web-01", host="DC0_C0_H1", datastore="LocalDS_0", network_map={"DC0_DVPG0": "VM Network"}
    )
    seen = []
    assert hv.copy_disk_network(replica.vm_id, target, "scsi0:0", progress=seen.append) == CAPACITY
    assert seen == list(range(4 * MiB, CAPACITY + 1, 4 * MiB))  # one call per 4 MiB chunk, in order
    hv.close()


def test_it_calls_progress_as_the_lab_copies(lab):
    from .helpers import network_map, replica_named

    replica = replica_named("app-erp")
    target = lab.create_vm_like(
        replica.vm_id, name="erp-prod", host="esx-prod-01", datastore="prod-ds-01", network_map=network_map(replica)
    )
    disk = replica.disks.first()
    seen = []
    copied = lab.copy_disk_network(replica.vm_id, target, disk.key, progress=seen.append)
    assert seen and seen == sorted(set(seen)) and seen[-1] == copied > 0
