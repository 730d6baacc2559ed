"""The portal on vSphere: connections, discovery and whole failbacks on vcsim, through the service layer."""

import filecmp
import os
import random
import threading

import pytest
from django.test import Client
from django.urls import reverse

from failback import connections, workflow
from failback.choices import Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.models import AuditEvent, FailbackSession, Replica, VCenterConnection

from .test_vsphere_vcsim import guest, resize_disk

pytestmark = [pytest.mark.vcsim, pytest.mark.django_db(databases="__all__", transaction=True)]

MiB = 1 << 20
WRONG_PIN = ":".join(["AB"] * 32)


@pytest.fixture
def connection(vcsim, admin_user):
    conn = VCenterConnection(
        name="vcsim",
        host=vcsim.host,
        port=vcsim.port,
        username=vcsim.user,
        tls_mode=VCenterConnection.TLS.THUMBPRINT,
        thumbprint=vcsim.thumbprint,
    )
    return connections.save_connection(admin_user, conn, password=vcsim.password)


def scribble(path, count, rng, size=MiB):
    """Guest writes: random data at random places of a disk file."""
    capacity = os.path.getsize(path)
    with open(path, "r+b") as fh:
        for _ in range(count):
            fh.seek(rng.randrange(0, max(1, capacity - size)))
            fh.write(rng.randbytes(size))


@pytest.fixture
def replica(connection, vcsim, operator):
    """A powered-on VM named like a replica, holding data, discovered by the sync and declared failed over."""
    hv = vcsim.hypervisor()
    source = next(vm for vm in hv.inventory().vms if vm.name == "DC0_H0_VM0")
    vm_id = hv.create_vm_like(
        source.vm_id,
        name="web-01_replica",
        host="DC0_H0",
        datastore="LocalDS_0",
        network_map={"DC0_DVPG0": "DC0_DVPG0"},
    )
    resize_disk(hv, vm_id, "scsi0:0", 64 * MiB)  # as an admin would in the vSphere client
    path = hv.disk_path(vm_id, "scsi0:0")
    scribble(path, 8, random.Random(1))
    hv.power_on(vm_id)
    hv.close()
    assert connections.sync_inventory(connection.pk) == 1
    replica = Replica.objects.get(name="web-01_replica")
    assert (replica.platform, replica.source_name, replica.state) == ("vsphere", "web-01", ReplicaState.READY)
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


def reload(session):
    return FailbackSession.objects.select_related("replica").get(pk=session.pk)


def assert_identical(vcsim, session):
    hv = vcsim.hypervisor()
    for disk in session.disks.all():
        assert filecmp.cmp(
            hv.disk_path(session.replica.vm_id, disk.key),
            hv.disk_path(session.production_vm_id, disk.key),
            shallow=False,
        )
        assert disk.verified
    hv.close()


def test_it_discovers_replicas_and_records_the_failover(replica):
    assert replica.state == ReplicaState.FAILOVER and replica.disks.count() >= 1
    row = AuditEvent.objects.get(action="declare_failover")
    assert (row.from_state, row.to_state, row.actor_name) == (ReplicaState.READY, ReplicaState.FAILOVER, "olivia")
    assert AuditEvent.objects.filter(action="sync_inventory", outcome=Outcome.OK).exists()


def test_it_fails_back_on_vsphere_and_commits_with_identical_disks(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    path = hv.disk_path(replica.vm_id, "scsi0:0")
    stop = threading.Event()

    def users_keep_working():
        rng = random.Random(2)
        while not stop.is_set():
            scribble(path, 1, rng, size=64 * 1024)

    writer = threading.Thread(target=users_keep_working)
    writer.start()
    try:
        session = reload(start(operator, replica))  # phase 1 runs while the writer writes
    finally:
        stop.set()
        writer.join()
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    scribble(path, 3, random.Random(3))  # more work while ready to switch
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert hv.power_state(replica.vm_id) == POWERED_OFF and hv.power_state(session.production_vm_id) == POWERED_ON
    assert_identical(vcsim, session)
    disk = session.disks.get()
    # create_vm_like turned change tracking on for the replica: the switch asked what changed since phase 1
    assert disk.method == "tracked" and disk.method_reason.startswith("Change tracking: ") and disk.change_id
    workflow.commit(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.COMMITTED and session.replica.state == ReplicaState.READY
    assert session.replica.production_vm_id == session.production_vm_id
    hv.close()


def test_it_refuses_the_switch_when_the_replica_s_disk_grew_in_vcenter(
    vcsim, replica, operator, admin_user, connection
):
    """vCenter reports the grown disk; the production VM was built with 64 MiB, so no override is offered.
    The next inventory sync records the new size."""
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    hv = vcsim.hypervisor()
    resize_disk(hv, replica.vm_id, "scsi0:0", 96 * MiB)  # hot-extended by an admin while the replica serves
    with pytest.raises(workflow.Refused, match="disk scsi0:0 grew from 64.0 MiB to 96.0 MiB"):
        workflow.switch_now(operator, session.pk)
    with pytest.raises(workflow.Refused, match="cannot be overridden"):
        workflow.switch_now(admin_user, session.pk, override_checks=True, reason="the window is closing")
    assert reload(session).status == SessionStatus.READY_TO_SWITCH
    assert hv.power_state(replica.vm_id) == POWERED_ON
    hv.close()
    connections.sync_inventory(connection.pk)
    assert list(replica.disks.values_list("key", "capacity_bytes")) == [("scsi0:0", 96 * MiB)]
    synced = AuditEvent.objects.filter(action="sync_inventory").latest("pk")
    assert "disks changed on 1 replica(s)" in synced.detail and synced.data["disks_changed"] == 1


def test_it_shuts_the_replica_s_guest_down_for_the_switch(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    guest(hv, replica.vm_id, "running", shutdown_delay=300)  # tools running, the OS takes 0.3 s
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO))
    assert session.status == SessionStatus.FAILBACK, session.error
    assert session.stop_method == "Guest OS shut down"
    assert hv.power_state(replica.vm_id) == POWERED_OFF
    assert "guest: ShutdownGuest " + replica.vm_id + " -> accepted" in vcsim.log()
    assert_identical(vcsim, session)
    hv.close()


def test_it_powers_the_replica_off_when_its_guest_hangs_on_shutdown(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    guest(hv, replica.vm_id, "running", shutdown_delay="never")
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO, shutdown_timeout_s=2))
    assert session.status == SessionStatus.FAILBACK, session.error
    assert session.stop_method == "Guest OS did not shut down within 2 s: powered off"
    assert hv.power_state(replica.vm_id) == POWERED_OFF
    assert_identical(vcsim, session)
    hv.close()


def test_it_powers_the_replica_off_at_once_when_its_tools_are_not_running(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    guest(hv, replica.vm_id, "notRunning")
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO))
    assert session.status == SessionStatus.FAILBACK, session.error
    assert session.stop_method == "No guest tools running on the replica: powered off at once"
    assert "ShutdownGuest" not in vcsim.log()  # never asked: vSphere would refuse it
    hv.close()


def test_it_undoes_on_vsphere(vcsim, replica, operator):
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO))
    assert session.status == SessionStatus.FAILBACK, session.error
    assert_identical(vcsim, session)
    workflow.undo(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.UNDONE and session.replica.state == ReplicaState.FAILOVER
    hv = vcsim.hypervisor()
    assert hv.power_state(replica.vm_id) == POWERED_ON
    assert session.production_vm_id not in {vm.vm_id for vm in hv.inventory().vms}
    hv.close()


def test_it_fails_back_over_the_network_transport(vcsim, replica, operator, connection):
    VCenterConnection.objects.filter(pk=connection.pk).update(transport=VCenterConnection.Transport.NETWORK)
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO))
    assert session.status == SessionStatus.FAILBACK, session.error
    assert_identical(vcsim, session)
    disk = session.disks.get()
    assert (
        disk.method == "full" and "Network transport" in disk.method_reason and disk.source_digest.startswith("sha256:")
    )


def test_it_puts_the_production_vm_in_the_chosen_resource_pool_and_folder(vcsim, replica, operator):
    hv = vcsim.hypervisor()
    placement = hv.placement()
    pool = next(pid for pid, path in placement.resource_pools.items() if "DC0_C0" in path)
    folder = next(iter(placement.folders))
    session = reload(start(operator, replica, resource_pool=pool, folder=folder))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    assert (session.resource_pool, session.folder) == (pool, folder)
    hv.close()


def test_it_refuses_an_unknown_resource_pool(replica, operator):
    with pytest.raises(workflow.Refused, match="Unknown resource pool"):
        start(operator, replica, resource_pool="resgroup-nope")


def test_it_offers_the_pools_of_the_picked_host(replica, operator):
    client = Client()
    client.force_login(operator)
    html = client.get(
        reverse("failback:start_pickers", args=[replica.pk]), {"target_host": "DC0_C0_H1"}
    ).content.decode()
    assert 'id="field-resource_pool"' in html and "DC0_C0/Resources" in html and "DC0_H0/Resources" not in html


@pytest.mark.faults
def test_it_refuses_the_switch_cleanly_when_vcenter_goes_away(vcsim, replica, operator):
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH
    vcsim.kill()
    with pytest.raises(workflow.Refused, match="Platform reachable: .*connection refused"):
        workflow.switch_now(operator, session.pk)  # the pre-switch checks cannot reach vCenter
    session = reload(session)
    assert session.status == SessionStatus.READY_TO_SWITCH and session.replica.state == ReplicaState.READY_TO_SWITCH
    assert AuditEvent.objects.get(session=session, action="switch").outcome == Outcome.REFUSED


def test_it_shows_a_wrong_password_in_the_page_and_the_audit(connection, admin_user):
    connection.set_password("not-the-password")
    connection.save(update_fields=["password_encrypted"])
    client = Client()
    client.force_login(admin_user)
    page = client.post(
        reverse("failback:connection_action", args=[connection.pk, "test"]), follow=True
    ).content.decode()
    assert "Failed:" in page and "not-the-password" not in page
    row = AuditEvent.objects.get(action="test_connection")
    assert row.outcome == Outcome.FAILED and "not-the-password" not in row.detail


def test_it_refuses_a_server_whose_thumbprint_changed(connection, admin_user):
    VCenterConnection.objects.filter(pk=connection.pk).update(thumbprint=WRONG_PIN)
    ok, result = connections.test_connection(admin_user, connection.pk)
    assert not ok and "thumbprint" in result.lower()
    assert AuditEvent.objects.get(action="test_connection").outcome == Outcome.FAILED


def test_it_reports_the_version_when_the_connection_works(connection, admin_user):
    ok, result = connections.test_connection(admin_user, connection.pk)
    assert ok and "VMware vCenter Server" in result


def test_it_keeps_the_password_encrypted_and_out_of_pages_and_audit(connection, vcsim, admin_user):
    stored = VCenterConnection.objects.get(pk=connection.pk)
    assert vcsim.password not in stored.password_encrypted and stored.reveal_password() == vcsim.password
    client = Client()
    client.force_login(admin_user)
    for url in (
        reverse("failback:connection", args=[connection.pk]),
        reverse("failback:connection_edit", args=[connection.pk]),
        reverse("failback:audit"),
    ):
        assert vcsim.password not in client.get(url).content.decode()
    assert not any(vcsim.password in str(row.data) + row.detail for row in AuditEvent.objects.all())


def test_it_lets_only_administrators_manage_connections(connection, operator):
    client = Client()
    client.force_login(operator)
    assert client.get(reverse("failback:connections")).status_code == 403
    with pytest.raises(workflow.Refused, match="Administrator role"):
        connections.test_connection(operator, connection.pk)


def test_it_discovers_replicas_by_custom_attribute(vcsim, connection):
    from pyVmomi import vim

    hv = vcsim.hypervisor()
    hv.about()  # logs in
    manager = hv._content.customFieldsManager
    field = manager.AddCustomFieldDef(name="failback.source", moType=vim.VirtualMachine)
    vm = next(v for v in hv.inventory().vms if v.name == "DC0_H0_VM1")
    manager.SetField(entity=vim.VirtualMachine(vm.vm_id, hv._stub), key=field.key, value="erp-01")
    hv.close()
    VCenterConnection.objects.filter(pk=connection.pk).update(replica_attribute="failback.source")
    assert connections.sync_inventory(connection.pk) == 1
    replica = Replica.objects.get(connection=connection, vm_id=vm.vm_id)
    assert (replica.name, replica.source_name) == ("DC0_H0_VM1", "erp-01")


def test_it_syncs_on_demand_through_a_worker_task_and_shows_live_power(vcsim, connection, admin_user, replica):
    client = Client()
    client.force_login(admin_user)
    page = client.post(
        reverse("failback:connection_action", args=[connection.pk, "sync"]), follow=True
    ).content.decode()
    assert "Inventory sync queued" in page
    assert AuditEvent.objects.filter(action="sync_inventory", outcome=Outcome.INFO, actor=admin_user).exists()
    assert AuditEvent.objects.filter(action="sync_inventory", outcome=Outcome.OK).count() >= 2  # fixture's and this one
    listing = client.get(reverse("failback:replicas")).content.decode()
    assert "web-01_replica" in listing and "poweredOn" in listing
