"""VSphereHypervisor against VMware's vCenter simulator (vcsim from Debian's govmomi 0.24).

No Django database: plain functions on a fresh simulator each. Change block tracking comes from the
project's own addition to vcsim (tests/vcsim/cbt.go), guest tools from another (guest.go). What vcsim
does not do (a free-space check, delta disks for snapshots) is stated where a test meets it.
"""

import os
import threading
import time
from pathlib import Path

import pytest
from pyVmomi import vim

from failback.hypervisors.base import POWERED_OFF, POWERED_ON, HypervisorError, InsufficientSpace, NotFound
from failback.hypervisors.vsphere import VSphereHypervisor, fetch_thumbprint
from failback.transfer import delta_copy, disk_digest, full_copy

from .vcsim_support import vcsim_factory  # noqa: F401

pytestmark = pytest.mark.vcsim

MiB = 1 << 20
WRONG_PIN = ":".join(["AB"] * 32)


# -- scaffolding: change the simulated world the way an admin would in the vSphere client ------------


def reconfigure(hv, vm_id, spec):
    task = hv._call(
        "reconfigure", lambda: vim.VirtualMachine(vm_id, hv._stub).ReconfigVM_Task(spec=spec), idempotent=False
    )
    hv._wait(task, "reconfigure")


def resize_disk(hv, vm_id, key, capacity):
    _, disk = hv._disk(vm_id, key, "find disk")
    disk.capacityInBytes, disk.capacityInKB = capacity, capacity // 1024
    reconfigure(
        hv, vm_id, vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])
    )


def add_thick_disk(hv, vm_id, capacity, datastore="LocalDS_0"):
    _, first = hv._disk(vm_id, "scsi0:0", "find disk")
    disk = vim.vm.device.VirtualDisk(
        key=-1,
        controllerKey=first.controllerKey,
        unitNumber=1,
        capacityInBytes=capacity,
        capacityInKB=capacity // 1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{datastore}]", diskMode="persistent", thinProvisioned=False, eagerlyScrub=True
        ),
    )
    reconfigure(
        hv,
        vm_id,
        vim.vm.ConfigSpec(
            deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)]
        ),
    )


def vm_named(hv, name):
    return next(vm for vm in hv.inventory().vms if vm.name == name)


def count_calls(hv, monkeypatch):
    """Names of the SOAP methods the hypervisor sends from now on."""
    calls = []
    original = hv._stub.InvokeMethod

    def counting(mo, info, args, outerStub=None):
        calls.append(info.wsdlName)
        return original(mo, info, args, outerStub)

    monkeypatch.setattr(hv._stub, "InvokeMethod", counting)
    return calls


def production_vm(hv, name="prod-web", host="DC0_C0_H1", **kw):
    replica = vm_named(hv, "DC0_H0_VM0")
    kw.setdefault("network_map", {"DC0_DVPG0": "VM Network"})
    return replica, hv.create_vm_like(replica.vm_id, name=name, host=host, datastore="LocalDS_0", **kw)


# -- connecting -----------------------------------------------------------------------------------------


def test_it_logs_in_and_reports_the_vcenter_version(vcsim):
    hv = vcsim.hypervisor()
    assert hv.about() == "VMware vCenter Server 6.5.0 build-5973321"
    assert hv.name == "vsphere"


def test_it_shows_the_thumbprint_on_first_contact_and_connects_with_it_pinned(vcsim):
    shown = fetch_thumbprint(vcsim.host, vcsim.port)
    assert shown == vcsim.thumbprint
    assert len(shown.split(":")) == 32
    compact = shown.replace(":", "").lower()  # as some tools print it
    assert vcsim.hypervisor(thumbprint=compact).about().startswith("VMware vCenter Server")


def test_it_refuses_a_server_whose_certificate_is_not_the_pinned_one(vcsim):
    hv = vcsim.hypervisor(thumbprint=WRONG_PIN)
    with pytest.raises(HypervisorError) as e:
        hv.about()
    message = str(e.value)
    assert "refusing to talk to" in message
    assert f"thumbprint {vcsim.thumbprint}, not the pinned {WRONG_PIN}" in message
    with pytest.raises(HypervisorError, match="SHA-256 thumbprint"):
        vcsim.hypervisor(thumbprint="12:34")  # SHA-1 or garbage: refused, never ignored


def test_it_never_accepts_an_unverified_certificate_without_a_pin(vcsim):
    hv = VSphereHypervisor(vcsim.host, port=vcsim.port, user=vcsim.user, password=vcsim.password, timeout=5)
    with pytest.raises(HypervisorError) as e:
        hv.about()  # a self-signed certificate: the system CA store does not trust it
    assert "is not trusted" in str(e.value) and "Pin its SHA-256 thumbprint" in str(e.value)
    with pytest.raises(HypervisorError, match="Refusing to connect without verifying"):
        VSphereHypervisor(vcsim.host, port=vcsim.port, user=vcsim.user, password=vcsim.password, verify=False)


def test_it_reports_a_wrong_password_with_vsphere_s_message(vcsim):
    hv = vcsim.hypervisor(password="not-the-password")
    with pytest.raises(HypervisorError) as e:
        hv.inventory()
    assert str(e.value) == f"vCenter {vcsim.host}:{vcsim.port} refused the login of {vcsim.user!r}: Login failure"
    assert e.value.fault == "InvalidLogin"


def test_it_logs_in_again_when_the_session_has_expired(vcsim):
    hv = vcsim.hypervisor()
    vm = vm_named(hv, "DC0_H0_VM0").vm_id
    before = hv._stub.cookie
    hv._content.sessionManager.Logout()  # vCenter ends idle sessions the same way
    assert hv.power_state(vm) == POWERED_ON
    assert hv._stub.cookie != before


# -- inventory --------------------------------------------------------------------------------------------


def test_it_reads_the_inventory_in_one_round_trip_whatever_the_number_of_vms(vcsim_factory, monkeypatch):
    sim = vcsim_factory("-vm", "6", "-cluster", "2", "-ds", "2")
    hv = sim.hypervisor()
    hv.about()
    calls = count_calls(hv, monkeypatch)
    inv = hv.inventory()
    assert calls == ["CreateContainerView", "RetrievePropertiesEx", "DestroyView"]
    assert inv.hosts == ("DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2", "DC0_C1_H0", "DC0_C1_H1", "DC0_C1_H2", "DC0_H0")
    assert set(inv.datastores) == {"LocalDS_0", "LocalDS_1"} and all(free > 0 for free in inv.datastores.values())
    assert {"VM Network", "DC0_DVPG0"} <= set(inv.networks)  # (vcsim does not mark its uplink port group as one)
    assert len(inv.vms) == 18  # 6 per standalone host and per cluster
    vm = next(v for v in inv.vms if v.name == "DC0_C1_RP0_VM5")
    assert (vm.cpus, vm.memory_mb, vm.firmware, vm.guest_os, vm.datastore) == (1, 32, "bios", "otherGuest", "LocalDS_0")
    assert [(d.key, d.capacity_bytes, d.thin) for d in vm.disks] == [("scsi0:0", MiB, True)]
    assert [(n.key, n.network) for n in vm.nics] == [("nic0", "DC0_DVPG0")]
    assert vm.host.startswith("DC0_C1_H")
    assert hv.vm_config(vm.vm_id) == vm


def test_it_lists_where_a_production_vm_can_go(vcsim_factory):
    hv = vcsim_factory("-pool", "1").hypervisor()
    p = hv.placement()
    assert p.datacenters == ("DC0",)
    assert p.clusters == {"DC0_C0": ("DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2")}
    assert p.hosts["DC0_H0"] is None and p.hosts["DC0_C0_H2"] == "DC0_C0"
    assert set(p.resource_pools.values()) == {
        "DC0/host/DC0_H0/Resources",
        "DC0/host/DC0_C0/Resources",
        "DC0/host/DC0_C0/Resources/DC0_C0_RP1",
    }
    assert list(p.folders.values()) == ["DC0/vm"]


# -- creating the production VM ---------------------------------------------------------------------------


def test_it_creates_the_production_vm_with_the_replica_s_configuration(vcsim):
    hv = vcsim.hypervisor()
    replica = vm_named(hv, "DC0_H0_VM0")
    reconfigure(
        hv, replica.vm_id, vim.vm.ConfigSpec(numCPUs=4, memoryMB=2048, firmware="efi", guestId="otherLinux64Guest")
    )
    add_thick_disk(hv, replica.vm_id, 3 * MiB)
    p = hv.placement()
    pool = next(i for i, path in p.resource_pools.items() if path.endswith("DC0_C0/Resources"))
    folder = next(iter(p.folders))

    vm_id = hv.create_vm_like(
        replica.vm_id,
        name="prod-web",
        host="DC0_C0_H1",
        datastore="LocalDS_0",
        network_map={"DC0_DVPG0": "VM Network"},
        resource_pool=pool,
        folder=folder,
    )

    prod = hv.vm_config(vm_id)
    assert (prod.name, prod.host, prod.datastore) == ("prod-web", "DC0_C0_H1", "LocalDS_0")
    assert (prod.cpus, prod.memory_mb, prod.firmware, prod.guest_os) == (4, 2048, "efi", "otherLinux64Guest")
    assert [(d.key, d.capacity_bytes, d.thin) for d in prod.disks] == [
        ("scsi0:0", MiB, True),
        ("scsi0:1", 3 * MiB, False),
    ]
    assert [(n.key, n.network) for n in prod.nics] == [("nic0", "VM Network")]
    assert hv.power_state(vm_id) == POWERED_OFF
    assert hv.vm_config(replica.vm_id).nics[0].network == "DC0_DVPG0"  # the replica is untouched


def test_it_creates_a_nic_mapped_to_no_network_disconnected_and_can_target_a_cluster(vcsim):
    hv = vcsim.hypervisor()
    _, vm_id = production_vm(hv, host="DC0_C0", network_map={"DC0_DVPG0": None})
    prod = hv.vm_config(vm_id)
    assert [(n.key, n.network) for n in prod.nics] == [("nic0", None)]
    assert prod.host in ("DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2")  # the cluster picked the host


def test_it_refuses_unknown_targets_duplicate_names_and_unmapped_networks(vcsim):
    hv = vcsim.hypervisor()
    replica = vm_named(hv, "DC0_H0_VM0").vm_id
    good = dict(name="prod-web", host="DC0_H0", datastore="LocalDS_0", network_map={"DC0_DVPG0": "VM Network"})
    count = len(hv.inventory().vms)
    with pytest.raises(NotFound, match="no host or cluster named 'DC9_H9'"):
        hv.create_vm_like(replica, **{**good, "host": "DC9_H9"})
    with pytest.raises(NotFound, match="no datastore named 'NFS_9'"):
        hv.create_vm_like(replica, **{**good, "datastore": "NFS_9"})
    with pytest.raises(NotFound, match="no network named 'Prod LAN'"):
        hv.create_vm_like(replica, **{**good, "network_map": {"DC0_DVPG0": "Prod LAN"}})
    with pytest.raises(HypervisorError, match="no mapping given for network 'DC0_DVPG0'"):
        hv.create_vm_like(replica, **{**good, "network_map": {}})
    with pytest.raises(HypervisorError, match="The name 'DC0_H0_VM1' already exists"):
        hv.create_vm_like(replica, **{**good, "name": "DC0_H0_VM1"})
    with pytest.raises(NotFound, match="No virtual machine 'vm-9999'"):
        hv.create_vm_like("vm-9999", **good)
    assert len(hv.inventory().vms) == count  # nothing half-made


def test_it_refuses_a_datastore_without_room_for_the_disks(vcsim):
    # vcsim itself never checks free space; vSphere would, late. We check before creating anything.
    hv = vcsim.hypervisor()
    replica = vm_named(hv, "DC0_H0_VM0").vm_id
    free = hv.inventory().datastores["LocalDS_0"]
    resize_disk(hv, replica, "scsi0:0", free + MiB)  # vcsim subtracts it again: free is now below zero
    with pytest.raises(InsufficientSpace, match="Insufficient disk space on datastore 'LocalDS_0'"):
        hv.create_vm_like(
            replica, name="prod-big", host="DC0_H0", datastore="LocalDS_0", network_map={"DC0_DVPG0": "VM Network"}
        )
    assert "prod-big" not in {vm.name for vm in hv.inventory().vms}


# -- power --------------------------------------------------------------------------------------------------


def test_it_powers_on_and_off_and_refuses_to_delete_a_running_vm(vcsim):
    hv = vcsim.hypervisor()
    _, vm_id = production_vm(hv)
    hv.power_on(vm_id)
    assert hv.power_state(vm_id) == POWERED_ON
    with pytest.raises(
        HypervisorError,
        match=r"Power on vm-\d+: The attempted operation cannot be performed in the current state \(Powered on\)\.",
    ):
        hv.power_on(vm_id)
    with pytest.raises(HypervisorError, match=r"Delete prod-web \(vm-\d+\): .*current state \(Powered on\)"):
        hv.delete_vm(vm_id)
    hv.power_off(vm_id)
    assert hv.power_state(vm_id) == POWERED_OFF
    with pytest.raises(HypervisorError, match=r"current state \(Powered off\)"):
        hv.power_off(vm_id)
    folder = os.path.dirname(hv.disk_path(vm_id, "scsi0:0"))
    hv.delete_vm(vm_id)
    with pytest.raises(NotFound):
        hv.power_state(vm_id)
    assert not os.path.exists(folder)


def guest(hv, vm_id, tools, shutdown_delay=None):
    """Give a VM a guest the simulator plays (tests/vcsim/guest.go): its tools, and how long it takes
    to shut down (milliseconds, or "never")."""
    options = [vim.option.OptionValue(key="vcsim.guest.tools", value=tools)]
    if shutdown_delay is not None:
        options.append(vim.option.OptionValue(key="vcsim.guest.shutdownDelay", value=str(shutdown_delay)))
    reconfigure(hv, vm_id, vim.vm.ConfigSpec(extraConfig=options))


def test_it_shuts_the_guest_down(vcsim):
    # vcsim's own VMs report no guest tools (the workflow would power off at once), yet vcsim answers
    # ShutdownGuest by powering the VM off immediately; real vSphere refuses it without tools.
    hv = vcsim.hypervisor()
    vm = vm_named(hv, "DC0_H0_VM1").vm_id
    assert hv.power_state(vm) == POWERED_ON
    assert hv.tools_running(vm) is False
    hv.shutdown_guest(vm)
    assert hv.power_state(vm) == POWERED_OFF
    with pytest.raises(HypervisorError, match=r"current state \(Powered off\)"):
        hv.shutdown_guest(vm)


def test_it_asks_a_guest_with_running_tools_to_shut_down_and_returns_at_once(vcsim):
    hv = vcsim.hypervisor()
    vm = vm_named(hv, "DC0_H0_VM1").vm_id
    guest(hv, vm, "running", shutdown_delay=500)
    assert hv.tools_running(vm) is True
    hv.shutdown_guest(vm)
    assert hv.power_state(vm) == POWERED_ON  # the guest OS is still shutting down
    deadline = time.monotonic() + 30
    while hv.power_state(vm) != POWERED_OFF and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hv.power_state(vm) == POWERED_OFF and hv.tools_running(vm) is False


def test_it_reports_vsphere_s_refusal_to_shut_down_a_guest_without_tools(vcsim):
    hv = vcsim.hypervisor()
    vm = vm_named(hv, "DC0_H0_VM1").vm_id
    guest(hv, vm, "notRunning")
    assert hv.tools_running(vm) is False
    with pytest.raises(
        HypervisorError,
        match=f"Shut down the guest of {vm}: Cannot complete operation because VMware Tools is not running",
    ):
        hv.shutdown_guest(vm)
    assert hv.power_state(vm) == POWERED_ON


# -- disks ----------------------------------------------------------------------------------------------------


def test_it_gives_the_flat_files_for_a_direct_copy_through_the_transfer_engine(vcsim, tmp_path):
    hv = vcsim.hypervisor()
    replica = vm_named(hv, "DC0_H0_VM0").vm_id
    resize_disk(hv, replica, "scsi0:0", 24 * MiB)
    _, prod = production_vm(hv)
    src, dst = hv.disk_path(replica, "scsi0:0"), hv.disk_path(prod, "scsi0:0")
    # vcsim keeps a disk's bytes in <disk>-flat.vmdk (empty at first); disk_path sizes it, sparse
    assert src.startswith(vcsim.datastores["LocalDS_0"]) and src.endswith("/DC0_H0_VM0/disk1-flat.vmdk")
    assert dst.endswith("/prod-web/prod-web-flat.vmdk")
    assert os.path.getsize(src) == os.path.getsize(dst) == 24 * MiB
    assert os.stat(dst).st_blocks == 0
    with open(src, "r+b") as f:
        for offset in (0, 5 * MiB + 123, 24 * MiB - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))

    full_copy(src, dst, state_dir=str(tmp_path / "state"), durable=False)
    assert open(src, "rb").read() == open(dst, "rb").read()

    with open(src, "r+b") as f:  # the replica keeps working; phase 2 compares digests (no CBT on vcsim)
        f.seek(17 * MiB)
        f.write(b"changed after phase 1" * 100)
    assert hv.change_tracking(replica, "scsi0:0") is None
    result = delta_copy(src, dst, state_dir=str(tmp_path / "state"), changed_extents=None, durable=False)
    assert result.bytes_written > 0
    assert disk_digest(src) == disk_digest(dst)


def test_it_reads_ranges_and_copies_whole_disks_over_the_network(vcsim):
    direct = vcsim.hypervisor()
    replica = vm_named(direct, "DC0_H0_VM0").vm_id
    resize_disk(direct, replica, "scsi0:0", 8 * MiB)
    _, prod = production_vm(direct)
    data = os.urandom(64 * 1024)
    with open(direct.disk_path(replica, "scsi0:0"), "r+b") as f:
        f.seek(3 * MiB)
        f.write(data)
    net = vcsim.hypervisor(transport="network")

    assert net.download_range(replica, "scsi0:0", 3 * MiB + 100, 1000) == data[100:1100]
    assert net.download_range(replica, "scsi0:0", 8 * MiB - 10, 10) == bytes(10)
    with pytest.raises(HypervisorError, match="outside the disk"):
        net.download_range(replica, "scsi0:0", 8 * MiB - 10, 11)
    with pytest.raises(HypervisorError, match="needs the direct transport"):
        net.disk_path(replica, "scsi0:0")

    stale = os.urandom(4096)  # on the production disk before the copy: the copy must replace it
    with open(direct.disk_path(prod, "scsi0:0"), "r+b") as f:
        f.seek(MiB)
        f.write(stale)
    assert net.download_range(prod, "scsi0:0", MiB, len(stale)) == stale

    # the file interface cannot write a range: the whole disk goes, a GET piped into one PUT
    assert net.copy_disk_network(replica, prod, "scsi0:0") == 8 * MiB
    assert net.download_range(prod, "scsi0:0", 3 * MiB, len(data)) == data
    assert net.download_range(prod, "scsi0:0", MiB, len(stale)) == bytes(len(stale))
    assert (
        open(direct.disk_path(prod, "scsi0:0"), "rb").read() == open(direct.disk_path(replica, "scsi0:0"), "rb").read()
    )

    resize_disk(direct, prod, "scsi0:0", 16 * MiB)
    with pytest.raises(HypervisorError, match=r"the disks differ in size \(8388608 and 16777216 bytes\)"):
        net.copy_disk_network(replica, prod, "scsi0:0")


def test_it_tracks_changes_only_when_change_tracking_is_on(vcsim):
    hv = vcsim.hypervisor()
    replica = vm_named(hv, "DC0_H0_VM0").vm_id
    assert hv.change_tracking(replica, "scsi0:0") is None  # CBT is off on vcsim's own VMs
    with pytest.raises(HypervisorError, match="change tracking is not enabled on DC0_H0_VM0"):
        hv.changed_areas(replica, "scsi0:0", "*")
    reconfigure(hv, replica, vim.vm.ConfigSpec(changeTrackingEnabled=True))
    first = hv.change_tracking(replica, "scsi0:0")
    assert first and first.endswith("/1")  # "xx xx .. xx-xx .. xx/N", as ESXi writes it
    with pytest.raises(NotFound, match="has no disk 'scsi0:7'"):
        hv.change_tracking(replica, "scsi0:7")


def test_it_reports_the_areas_changed_since_a_change_id(vcsim):
    hv = vcsim.hypervisor()
    replica = vm_named(hv, "DC0_H0_VM0").vm_id
    resize_disk(hv, replica, "scsi0:0", 64 * MiB)
    path = hv.disk_path(replica, "scsi0:0")
    with open(path, "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    reconfigure(hv, replica, vim.vm.ConfigSpec(changeTrackingEnabled=True))
    start = hv.change_tracking(replica, "scsi0:0")
    everything = hv.changed_areas(replica, "scsi0:0", "*")
    assert everything.extents == ((5 * MiB, MiB),)  # "*": the allocated areas
    assert everything.change_id == start  # the temporary snapshot froze the same state

    with open(path, "r+b") as f:  # the guest writes 10 bytes in one block and 70 KiB across two
        f.seek(20 * MiB + 100)
        f.write(b"x" * 10)
        f.seek(40 * MiB + 60 * 1024)
        f.write(os.urandom(70 * 1024))
    now = hv.change_tracking(replica, "scsi0:0")
    assert now != start and now.rsplit("/", 1)[0] == start.rsplit("/", 1)[0]  # same epoch, later id
    changed = hv.changed_areas(replica, "scsi0:0", start)
    assert changed.extents == ((20 * MiB, 64 * 1024), (40 * MiB, 3 * 64 * 1024))  # 64 KiB blocks, merged
    assert changed.change_id == now
    assert hv.changed_areas(replica, "scsi0:0", now).extents == ()
    leftovers = list(Path(vcsim.datastores["LocalDS_0"]).rglob("*.vmsn"))
    assert leftovers == []  # every temporary snapshot was removed again


def test_it_refuses_a_change_id_from_before_a_change_tracking_reset(vcsim):
    hv = vcsim.hypervisor()
    replica = vm_named(hv, "DC0_H0_VM0").vm_id
    reconfigure(hv, replica, vim.vm.ConfigSpec(changeTrackingEnabled=True))
    old = hv.change_tracking(replica, "scsi0:0")
    reconfigure(hv, replica, vim.vm.ConfigSpec(changeTrackingEnabled=False))  # an admin's CBT reset
    reconfigure(hv, replica, vim.vm.ConfigSpec(changeTrackingEnabled=True))
    new = hv.change_tracking(replica, "scsi0:0")
    assert new.rsplit("/", 1)[0] != old.rsplit("/", 1)[0]
    for stale in (old, new.rsplit("/", 1)[0] + "/99", "not an id"):
        with pytest.raises(HypervisorError, match="A specified parameter was not correct: changeId"):
            hv.changed_areas(replica, "scsi0:0", stale)


# -- failures of the connection ----------------------------------------------------------------------------


@pytest.mark.faults
def test_it_fails_clearly_and_in_time_when_vcenter_goes_away_mid_call(vcsim_factory):
    sim = vcsim_factory("-method-delay", "PowerOffVM_Task:60000")
    hv = sim.hypervisor(timeout=4, retries=2)
    vm = vm_named(hv, "DC0_H0_VM0").vm_id
    threading.Timer(0.5, sim.kill).start()
    started = time.monotonic()
    with pytest.raises(HypervisorError) as e:
        hv.power_off(vm)  # changes state: not retried after the request left
    assert time.monotonic() - started < 30  # the call hangs for 60 s: the margin is for a busy machine
    assert str(e.value).startswith(f"Power off {vm}: lost the connection to vCenter {sim.host}:{sim.port}")

    started = time.monotonic()
    with pytest.raises(HypervisorError) as e:
        hv.power_state(vm)  # a read: retried, then given up
    assert time.monotonic() - started < 30
    assert str(e.value) == (
        f"Read the power state of {vm}: cannot connect to vCenter {sim.host}:{sim.port}: "
        "connection refused (after 3 attempts)"
    )


@pytest.mark.faults
def test_it_gives_up_on_a_call_that_hangs_after_the_timeout(vcsim_factory):
    sim = vcsim_factory("-method-delay", "CurrentTime:60000")
    hv = sim.hypervisor(timeout=0.5, retries=1)
    started = time.monotonic()
    with pytest.raises(HypervisorError) as e:
        hv.about()
    assert time.monotonic() - started < 30  # not the 60 s the call hangs for
    assert str(e.value) == (
        f"Test the connection to vCenter {sim.host}:{sim.port}: vCenter {sim.host}:{sim.port} "
        "did not answer within 0.5 s (after 2 attempts)"
    )
