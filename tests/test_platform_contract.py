"""The hypervisor contract: the same behavioural checks against every platform, with no mocks.

Each platform is a real one: the lab over a temporary directory, and vSphere against VMware's
vCenter simulator (vcsim), once with the direct transport (datastores mounted locally) and once
with the network transport (the datastore HTTP file interface). A new platform joins by adding a
``Platform`` case below (see docs/platforms.md): every test then runs against it.

Per case the fixture gives a hypervisor, a source VM with a disk, where a new VM may go (host,
datastore, network map) and a way to put bytes on a disk from outside the portal (a guest writing,
or a file written on the datastore). A case says whether the platform tracks changes; one that does
not must refuse explicitly instead of giving changed areas. vcsim tracks them through the project's
QueryChangedDiskAreas (tests/vcsim/cbt.go), with change tracking turned on for the source VM.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from failback.hypervisors.base import (
    POWERED_OFF,
    POWERED_ON,
    ChangedAreas,
    DiskAccess,
    Hypervisor,
    HypervisorError,
    NotFound,
    Placement,
    VMConfig,
)
from failback.hypervisors.lab import LabHypervisor
from failback.hypervisors.registry import FACTORIES, Platform

from .vcsim_support import start_vcsim

MiB = 1 << 20
DISK = 8 * MiB  # every source disk of the cases below
_names = itertools.count(1)


@dataclass
class Case:
    """One platform, set up for the contract."""

    hv: Any  # the adapter under test
    source: str  # a VM with a disk of DISK bytes under disk_key
    disk_key: str
    host: str
    datastore: str
    network_map: dict[str, str | None]
    write: Callable[[str, str, int, bytes], None]  # put bytes on a disk the way a guest would
    tracks_changes: bool  # whether change_tracking() gives ids on this platform
    with_tools: Callable[[str], None] = lambda vm_id: None  # give a VM a guest whose tools run (the lab's have)

    def new_name(self) -> str:
        return f"contract-{next(_names)}-{os.getpid()}"

    def create(self, **kw: Any) -> str:
        """A VM like the source, at the case's host and datastore unless ``kw`` says otherwise."""
        kw = {
            "name": self.new_name(),
            "host": self.host,
            "datastore": self.datastore,
            "network_map": self.network_map,
            **kw,
        }
        return self.hv.create_vm_like(self.source, **kw)


def _lab_case(root) -> Case:
    lab = LabHypervisor(root)
    lab.add_host("esx-dr-01")
    lab.add_host("esx-prod-01")
    lab.add_datastore("dr-ds", 10 * DISK)
    lab.add_datastore("prod-ds", 10 * DISK)
    lab.add_network("dr-net")
    lab.add_network("prod-net")
    source = lab.create_vm(
        "app-01_replica",
        host="esx-dr-01",
        datastore="dr-ds",
        disks=[DISK],
        networks=["dr-net"],
        power_on=True,
        cbt=True,
    )
    return Case(
        lab,
        source,
        "scsi0:0",
        "esx-prod-01",
        "prod-ds",
        {"dr-net": "prod-net"},
        write=lab.guest_write,
        tracks_changes=True,
    )


def _vsphere_case(sim, transport: str) -> Case:
    from pyVmomi import vim

    from .test_vsphere_vcsim import reconfigure, resize_disk

    direct = sim.hypervisor()  # writes the flat files on vcsim's local datastore, as a guest's I/O would land
    hv = direct if transport == "direct" else sim.hypervisor(transport="network")
    source = next(vm.vm_id for vm in direct.inventory().vms if vm.name == "DC0_H0_VM0")
    resize_disk(direct, source, "scsi0:0", DISK)
    reconfigure(direct, source, vim.vm.ConfigSpec(changeTrackingEnabled=True))

    def write(vm_id: str, disk_key: str, offset: int, data: bytes) -> None:
        with open(direct.disk_path(vm_id, disk_key), "r+b") as f:
            f.seek(offset)
            f.write(data)

    def with_tools(vm_id: str) -> None:  # vcsim plays a guest on request (tests/vcsim/guest.go)
        spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="vcsim.guest.tools", value="running")])
        reconfigure(direct, vm_id, spec)

    return Case(
        hv,
        source,
        "scsi0:0",
        "DC0_C0_H1",
        "LocalDS_0",
        {"DC0_DVPG0": "VM Network"},
        write=write,
        tracks_changes=True,
        with_tools=with_tools,
    )


VSPHERE_TRANSPORTS = {"vsphere": "direct", "vsphere-network": "network"}


@pytest.fixture(
    scope="module",
    params=[
        "lab",
        pytest.param("vsphere", marks=pytest.mark.vcsim),
        pytest.param("vsphere-network", marks=pytest.mark.vcsim),
    ],
)
def case(request, tmp_path_factory):
    """One platform for the whole module (each test names its own VMs): a vcsim starts once per case."""
    if request.param == "lab":
        yield _lab_case(tmp_path_factory.mktemp("lab"))
        return
    sim = start_vcsim(request.getfixturevalue("vcsim_binary"), tmp_path_factory.mktemp("vcsim"))
    c = _vsphere_case(sim, VSPHERE_TRANSPORTS[request.param])
    try:
        yield c
    finally:
        c.hv.close()
        sim.stop()


# -- the Protocol -------------------------------------------------------------------------------------


def test_it_implements_the_whole_protocol(case):
    hv = case.hv
    assert isinstance(hv, Hypervisor) and isinstance(hv, DiskAccess)
    assert hv.name in Platform.values and hv.name in FACTORIES
    assert hv.transport in ("direct", "network", "nbd")
    assert isinstance(hv.where, str) and hv.where
    assert isinstance(hv.about(), str) and hv.about()
    assert isinstance(hv.placement(), Placement)
    assert hv.custom_attribute_values("no-such-attribute") == {}
    assert isinstance(hv.vm_meta(case.source), dict)


def test_a_lab_placement_is_empty_and_its_transport_direct(tmp_path):
    lab = LabHypervisor(tmp_path)
    assert lab.placement() == Placement() and lab.transport == "direct"
    assert lab.about().startswith(f"Lab hypervisor at {lab.root}")


# -- inventory -------------------------------------------------------------------------------------------


def test_the_inventory_lists_hosts_datastores_and_the_source(case):
    inv = case.hv.inventory()
    assert case.host in inv.hosts
    assert inv.datastores.get(case.datastore, 0) > 0
    assert set(case.hv.host_states()) == set(inv.hosts)
    assert set(case.hv.host_states().values()) <= {"connected", "maintenance", "disconnected", "notResponding"}
    assert case.source in {vm.vm_id for vm in inv.vms}


def test_vm_config_describes_the_source(case):
    cfg = case.hv.vm_config(case.source)
    assert isinstance(cfg, VMConfig) and cfg.vm_id == case.source
    assert cfg.cpus > 0 and cfg.memory_mb > 0 and cfg.firmware in ("bios", "efi")
    assert {d.key: d.capacity_bytes for d in cfg.disks}[case.disk_key] == DISK
    assert {n.network for n in cfg.nics if n.network} <= set(case.network_map)
    assert cfg == next(vm for vm in case.hv.inventory().vms if vm.vm_id == case.source)
    with pytest.raises(NotFound):
        case.hv.vm_config("vm-999999")


# -- lifecycle ---------------------------------------------------------------------------------------------


def test_create_vm_like_gives_the_same_disks_empty_and_an_owner_tag(case):
    hv = case.hv
    case.write(case.source, case.disk_key, MiB, b"replica data" * 100)
    tag = f"contract-owner-{next(_names)}"
    new = case.create(owner_tag=tag)
    source, made = hv.vm_config(case.source), hv.vm_config(new)
    assert [(d.key, d.capacity_bytes) for d in made.disks] == [(d.key, d.capacity_bytes) for d in source.disks]
    assert all(d.datastore == case.datastore for d in made.disks)
    assert hv.download_range(new, case.disk_key, MiB, 1200) == bytes(1200)  # no data came along
    assert hv.download_range(new, case.disk_key, DISK - 4096, 4096) == bytes(4096)
    assert hv.power_state(new) == POWERED_OFF
    assert hv.vm_owner(new) == tag and hv.find_owned_vm(tag) == new
    assert hv.find_owned_vm(f"unknown-{tag}") is None
    assert hv.vm_owner(case.source) is None
    with pytest.raises(HypervisorError):  # a name in use
        case.create(name=made.name)
    with pytest.raises(NotFound):
        case.create(datastore="no-such-datastore")


def test_power_operations_and_the_power_states_agree(case):
    hv = case.hv
    vm = case.create()
    hv.power_on(vm)
    assert hv.power_state(vm) == POWERED_ON == hv.power_states()[vm]
    with pytest.raises(HypervisorError):  # a delete is refused while the VM runs
        hv.delete_vm(vm)
    hv.power_off(vm)
    assert hv.power_state(vm) == POWERED_OFF == hv.power_states()[vm]
    assert hv.tools_running(vm) is False


def test_guest_ready_follows_the_power_and_the_guest_tools(case):
    hv = case.hv
    vm = case.create()
    case.with_tools(vm)
    assert hv.guest_ready(vm) is False  # powered off
    hv.power_on(vm)
    assert hv.guest_ready(vm) is True
    hv.power_off(vm)
    assert hv.guest_ready(vm) is False
    hv.delete_vm(vm)


def test_a_deleted_vm_is_gone(case):
    hv = case.hv
    tag = f"contract-owner-{next(_names)}"
    vm = case.create(owner_tag=tag)
    hv.delete_vm(vm)
    with pytest.raises(NotFound):
        hv.vm_config(vm)
    assert vm not in hv.power_states()
    assert hv.find_owned_vm(tag) is None


# -- disk access ----------------------------------------------------------------------------------------------


def test_download_range_returns_the_bytes_written(case):
    hv = case.hv
    data = os.urandom(64 * 1024)
    case.write(case.source, case.disk_key, 3 * MiB + 512, data)
    assert hv.download_range(case.source, case.disk_key, 3 * MiB + 512, len(data)) == data
    assert hv.download_range(case.source, case.disk_key, 3 * MiB + 1000, 100) == data[488:588]
    assert hv.download_range(case.source, case.disk_key, DISK - 10, 10) == bytes(10)
    with pytest.raises(HypervisorError, match="outside the disk"):
        hv.download_range(case.source, case.disk_key, DISK - 10, 11)
    with pytest.raises(NotFound):
        hv.download_range(case.source, "scsi0:7", 0, 1)


@pytest.mark.nbd
def test_nbd_export_says_how_nbdkit_serves_the_disk(case):
    """The nbd transport's part: the export nbdkit serves holds the disk's bytes, read-only unless
    asked to be writable (the engine then writes through it)."""
    from failback.jobs.nbd import Servers
    from failback.transfer.blockio import opened

    from .nbd_support import require_nbd

    require_nbd()
    hv = case.hv
    data = os.urandom(64 * 1024)
    case.write(case.source, case.disk_key, 5 * MiB, data)
    read = hv.nbd_export(case.source, case.disk_key, writable=False)
    assert read.readonly and not hv.nbd_export(case.source, case.disk_key, writable=True).readonly
    servers = Servers()
    try:
        uri = servers.serve(read, "contract")
        with opened(uri, os.O_RDONLY) as disk:
            assert disk.size == DISK and disk.pread(len(data), 5 * MiB) == data
            with pytest.raises(OSError, match="does not support write"):
                disk.pwrite(memoryview(data), 0)
    finally:
        servers.close()


def test_copy_disk_network_makes_the_target_disk_equal_to_the_source(case):
    hv = case.hv
    data = os.urandom(32 * 1024)
    case.write(case.source, case.disk_key, 5 * MiB, data)
    target = case.create()
    hv.power_on(target)  # a lab guest writes only while running
    case.write(target, case.disk_key, 2 * MiB, b"stale" * 800)  # the copy replaces the whole disk
    hv.power_off(target)
    sent = hv.copy_disk_network(case.source, target, case.disk_key)
    assert 0 < sent <= DISK
    assert hv.download_range(target, case.disk_key, 5 * MiB, len(data)) == data
    for offset in range(0, DISK, MiB):
        assert hv.download_range(target, case.disk_key, offset, MiB) == hv.download_range(
            case.source, case.disk_key, offset, MiB
        )


def test_disk_path_is_a_local_file_in_direct_transport_only(case):
    hv = case.hv
    if hv.transport == "direct":
        assert os.path.getsize(hv.disk_path(case.source, case.disk_key)) == DISK
    else:
        with pytest.raises(HypervisorError, match="needs the direct transport"):
            hv.disk_path(case.source, case.disk_key)


def test_change_tracking_reports_a_write_or_says_it_cannot(case):
    hv = case.hv
    before = hv.change_tracking(case.source, case.disk_key)
    if not case.tracks_changes:
        assert before is None  # the caller then compares digests
        with pytest.raises(HypervisorError):
            hv.changed_areas(case.source, case.disk_key, "*")
        return
    assert before is not None
    case.write(case.source, case.disk_key, 6 * MiB + 100, b"x" * 5000)
    areas = hv.changed_areas(case.source, case.disk_key, before)
    assert isinstance(areas, ChangedAreas) and areas.change_id != before
    assert any(start <= 6 * MiB + 100 and 6 * MiB + 5100 <= start + length for start, length in areas.extents)
    assert hv.changed_areas(case.source, case.disk_key, areas.change_id).extents == ()
    with pytest.raises(NotFound):
        hv.change_tracking(case.source, "scsi0:7")
