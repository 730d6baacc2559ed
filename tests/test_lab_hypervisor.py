"""The lab hypervisor on real sparse files: seeding, VM lifecycle, guest shutdown, change tracking
across processes, and the workload generator. No Django, no database."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from failback.hypervisors.base import (
    POWERED_OFF,
    POWERED_ON,
    SUSPENDED,
    Hypervisor,
    HypervisorError,
    InsufficientSpace,
    NotFound,
)
from failback.hypervisors.lab import BLOCK_SIZE, LabHypervisor
from failback.hypervisors.lab_demo import run_workload, seed_demo

KiB, MiB, GiB = 1024, 1024**2, 1024**3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def lab(tmp_path):
    hv = LabHypervisor(tmp_path / "lab")
    for h in ("esx-prod-01", "esx-dr-01"):
        hv.add_host(h)
    hv.add_datastore("prod-ds-01", 64 * MiB)
    hv.add_datastore("dr-ds-01", 1 * GiB)
    for n in ("prod-net", "dr-net", "dr-dmz"):
        hv.add_network(n)
    return hv


def make_replica(hv, name="erp_replica", disks=(8 * MiB, 3 * MiB + 5 * KiB), **kw):
    kw.setdefault("networks", ("dr-net", "dr-dmz", None))
    return hv.create_vm(
        name,
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=disks,
        cpus=4,
        memory_mb=8192,
        guest_os="rhel8_64Guest",
        firmware="efi",
        workload=True,
        **kw,
    )


def test_it_seeds_a_two_site_lab_with_sparse_disks_of_exact_sizes(tmp_path):
    ids = seed_demo(tmp_path / "lab", count=6, scale=0.02, seed=7)
    hv = LabHypervisor(tmp_path / "lab")
    inv = hv.inventory()
    assert isinstance(hv, Hypervisor)
    assert set(inv.hosts) == {"esx-prod-01", "esx-prod-02", "esx-dr-01", "esx-dr-02"}
    assert set(inv.datastores) == {"prod-ds-01", "prod-ds-02", "dr-ds-01"}
    assert set(inv.networks) == {"prod-net", "prod-dmz", "dr-net", "dr-dmz"}
    assert [vm.vm_id for vm in inv.vms] == ids and len(ids) == 6
    tools = []
    for vm in inv.vms:
        assert vm.name.endswith("_replica") and vm.host.startswith("esx-dr-")
        assert hv.power_state(vm.vm_id) == POWERED_ON
        assert 1 <= len(vm.disks) <= 3
        for d in vm.disks:
            st = os.stat(hv.disk_path(vm.vm_id, d.key))
            assert st.st_size == d.capacity_bytes
            assert 0 < st.st_blocks * 512 < d.capacity_bytes  # some data, with holes
            if hv.vm_meta(vm.vm_id)["cbt"]:  # seed data is not a change
                cid = hv.change_tracking(vm.vm_id, d.key)
                assert cid.endswith("/0") and hv.changed_areas(vm.vm_id, d.key, cid).extents == ()
        tools.append(vm.tools_installed)
    assert tools.count(False) == 1  # every 4th
    metas = [hv.vm_meta(i) for i in ids]
    assert [m["shutdown_hangs"] for m in metas].count(True) == 1
    assert [m["cbt"] for m in metas].count(False) == 1
    used = sum(d.capacity_bytes for vm in inv.vms for d in vm.disks)
    assert inv.datastores["dr-ds-01"] == int(400 * GiB * 0.02) // (64 * KiB) * (64 * KiB) - used

    # Idempotent, and deterministic for a seed.
    assert seed_demo(tmp_path / "lab", count=6, scale=0.02, seed=7) == ids
    seed_demo(tmp_path / "again", count=6, scale=0.02, seed=7)
    again = LabHypervisor(tmp_path / "again")
    for vm_id in ids:
        assert again.vm_config(vm_id).name == hv.vm_config(vm_id).name
        for d in hv.vm_config(vm_id).disks:
            assert Path(again.disk_path(vm_id, d.key)).read_bytes() == Path(hv.disk_path(vm_id, d.key)).read_bytes()


def test_it_refuses_to_seed_a_lab_it_did_not_create(lab):
    with pytest.raises(HypervisorError, match="Refusing to seed"):
        seed_demo(lab.root, count=2, scale=0.01)


def test_it_creates_a_vm_like_the_replica_with_empty_disks_and_mapped_nics(lab):
    src = make_replica(lab, power_on=True)
    lab.guest_write(src, "scsi0:0", 0, b"x" * 4096)
    new = lab.create_vm_like(
        src, name="erp", host="esx-prod-01", datastore="prod-ds-01", network_map={"dr-net": "prod-net", "dr-dmz": None}
    )
    a, b = lab.vm_config(src), lab.vm_config(new)
    assert (b.name, b.host, b.datastore) == ("erp", "esx-prod-01", "prod-ds-01")
    assert (b.cpus, b.memory_mb, b.guest_os, b.firmware, b.tools_installed) == (4, 8192, "rhel8_64Guest", "efi", True)
    assert [(d.key, d.capacity_bytes, d.datastore) for d in b.disks] == [
        (d.key, d.capacity_bytes, "prod-ds-01") for d in a.disks
    ]
    assert [n.network for n in b.nics] == ["prod-net", None, None]
    assert lab.power_state(new) == POWERED_OFF and lab.vm_meta(new)["workload"] is True
    for d in b.disks:
        path = lab.disk_path(new, d.key)
        assert path.startswith(str(lab.root / "datastores" / "prod-ds-01"))
        assert os.stat(path).st_size == d.capacity_bytes and os.stat(path).st_blocks == 0
        assert path != lab.disk_path(src, d.key)
    assert lab.inventory().datastores["prod-ds-01"] == 64 * MiB - (11 * MiB + 5 * KiB)

    lab.delete_vm(new)
    assert not (lab.root / "datastores" / "prod-ds-01" / new).exists()
    with pytest.raises(NotFound):
        lab.vm_config(new)
    with pytest.raises(HypervisorError, match="Powered on"):
        lab.delete_vm(src)


def test_it_refuses_unknown_targets_duplicate_names_and_a_full_datastore(lab):
    src = make_replica(lab)
    ok = {
        "name": "erp",
        "host": "esx-prod-01",
        "datastore": "prod-ds-01",
        "network_map": {"dr-net": "prod-net", "dr-dmz": "prod-net"},
    }
    with pytest.raises(NotFound, match="host"):
        lab.create_vm_like(src, **{**ok, "host": "esx-nowhere"})
    with pytest.raises(NotFound, match="datastore"):
        lab.create_vm_like(src, **{**ok, "datastore": "nope"})
    with pytest.raises(NotFound, match="network"):
        lab.create_vm_like(src, **{**ok, "network_map": {"dr-net": "nope", "dr-dmz": None}})
    with pytest.raises(HypervisorError, match="No mapping"):
        lab.create_vm_like(src, **{**ok, "network_map": {"dr-net": "prod-net"}})
    with pytest.raises(NotFound):
        lab.create_vm_like("vm-999", **ok)
    with pytest.raises(HypervisorError, match="already exists"):
        lab.create_vm_like(src, **{**ok, "name": "erp_replica"})
    big = make_replica(lab, name="big_replica", disks=(40 * MiB, 20 * MiB))
    lab.create_vm_like(src, **ok)  # 11 MiB of 64
    with pytest.raises(InsufficientSpace, match="prod-ds-01"):
        lab.create_vm_like(big, **{**ok, "name": "big"})  # 60 MiB > 53 MiB free
    assert [vm.name for vm in lab.inventory().vms] == ["erp_replica", "big_replica", "erp"]
    assert sorted(os.listdir(lab.root / "datastores" / "prod-ds-01")) == [lab.find_vm("erp")]


def test_it_powers_on_off_and_suspends_like_a_hypervisor(lab):
    vm = make_replica(lab)
    assert lab.power_state(vm) == POWERED_OFF and not lab.tools_running(vm)
    with pytest.raises(HypervisorError, match="Powered off"):
        lab.power_off(vm)
    lab.power_on(vm)
    assert lab.power_state(vm) == POWERED_ON and lab.tools_running(vm)
    with pytest.raises(HypervisorError, match="Powered on"):
        lab.power_on(vm)
    lab.suspend(vm)
    assert lab.power_state(vm) == SUSPENDED and not lab.tools_running(vm)
    with pytest.raises(HypervisorError, match="Suspended"):
        lab.shutdown_guest(vm)
    with pytest.raises(HypervisorError, match="not running"):
        lab.guest_write(vm, "scsi0:0", 0, b"x")
    lab.power_on(vm)  # resume
    lab.power_off(vm)
    assert lab.power_state(vm) == POWERED_OFF


def test_it_shuts_the_guest_down_after_its_shutdown_time(lab):
    vm = make_replica(lab, power_on=True)
    lab.set_vm_options(vm, shutdown_seconds=0.3)
    lab.shutdown_guest(vm)
    lab.shutdown_guest(vm)  # a second request changes nothing
    assert lab.power_state(vm) == POWERED_ON
    time.sleep(0.4)
    assert lab.power_state(vm) == POWERED_OFF and not lab.tools_running(vm)
    assert LabHypervisor(lab.root).power_state(vm) == POWERED_OFF  # derived from the files alone


def test_it_never_finishes_a_hanging_shutdown_until_powered_off(lab):
    vm = make_replica(lab, power_on=True, shutdown_seconds=0.1, shutdown_hangs=True)
    lab.shutdown_guest(vm)
    time.sleep(0.3)
    assert lab.power_state(vm) == POWERED_ON
    lab.power_off(vm)
    assert lab.power_state(vm) == POWERED_OFF


def test_it_refuses_a_guest_shutdown_without_tools(lab):
    vm = make_replica(lab, power_on=True, tools_installed=False)
    assert not lab.tools_running(vm)
    with pytest.raises(HypervisorError, match="Tools is not running"):
        lab.shutdown_guest(vm)
    assert lab.power_state(vm) == POWERED_ON


def test_it_tracks_exactly_the_blocks_written_since_a_change_id(lab):
    vm = make_replica(lab, power_on=True)
    disk = "scsi0:1"  # 3 MiB + 5 KiB: the last block is short
    size = 3 * MiB + 5 * KiB
    lab.guest_write(vm, disk, 0, b"before")
    since = lab.change_tracking(vm, disk)
    lab.guest_write(vm, disk, 100 * KiB, b"a" * 10)  # block 1
    lab.guest_write(vm, disk, 130 * KiB, b"b" * 100 * KiB)  # blocks 2-3
    lab.guest_write(vm, disk, 1 * MiB, b"c" * 64 * KiB)  # block 16 exactly
    lab.guest_write(vm, disk, size - 2 * KiB, b"d" * 2 * KiB)  # tail block 48
    areas = lab.changed_areas(vm, disk, since)
    assert areas.extents == ((64 * KiB, 192 * KiB), (1 * MiB, 64 * KiB), (48 * BLOCK_SIZE, 5 * KiB))
    assert areas.change_id == lab.change_tracking(vm, disk)
    assert lab.changed_areas(vm, disk, areas.change_id).extents == ()
    with open(lab.disk_path(vm, disk), "rb") as f:
        assert f.read(6) == b"before"
        f.seek(130 * KiB)
        assert f.read(100 * KiB) == b"b" * 100 * KiB
        f.seek(size - 2 * KiB)
        assert f.read() == b"d" * 2 * KiB
    assert lab.changed_areas(vm, "scsi0:0", lab.change_tracking(vm, "scsi0:0")).extents == ()
    assert lab.changed_areas(vm, disk, "*").extents[0] == (0, 4 * BLOCK_SIZE)  # allocated areas

    with pytest.raises(HypervisorError, match="does not belong"):
        lab.changed_areas(vm, disk, lab.change_tracking(vm, "scsi0:0").split("/")[0] + "/0")
    with pytest.raises(HypervisorError, match="Invalid change id"):
        lab.changed_areas(vm, disk, "garbage")
    with pytest.raises(HypervisorError, match="outside disk"):
        lab.guest_write(vm, disk, size - 1, b"xx")


def test_it_offers_no_change_tracking_when_cbt_is_off(lab):
    vm = make_replica(lab, power_on=True)
    old = lab.change_tracking(vm, "scsi0:0")
    lab.set_vm_options(vm, cbt=False)
    assert lab.change_tracking(vm, "scsi0:0") is None
    with pytest.raises(HypervisorError, match="not enabled"):
        lab.changed_areas(vm, "scsi0:0", old)
    lab.guest_write(vm, "scsi0:0", 0, b"x")  # still written, not tracked
    lab.set_vm_options(vm, cbt=True)
    with pytest.raises(HypervisorError, match="reset"):
        lab.changed_areas(vm, "scsi0:0", old)
    assert lab.changed_areas(vm, "scsi0:0", lab.change_tracking(vm, "scsi0:0")).extents == ()


CHILD = textwrap.dedent("""
    import sys
    from failback.hypervisors.lab import LabHypervisor
    hv = LabHypervisor(sys.argv[1])
    for i in range(int(sys.argv[2])):
        hv.guest_write(sys.argv[3], "scsi0:0", (i * 2 + 1) * 65536, b"child" * 100)
""")


def test_it_loses_no_change_records_when_another_process_writes(lab):
    vm = make_replica(lab, disks=(64 * MiB,), power_on=True)
    since = first = lab.change_tracking(vm, "scsi0:0")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(lab.root), "250", vm], env=env) for _ in range(2)]
    seen: set[int] = set()
    for i in range(250):  # this process writes the even blocks and reads changes meanwhile
        lab.guest_write(vm, "scsi0:0", i * 2 * BLOCK_SIZE, b"parent")
        areas = lab.changed_areas(vm, "scsi0:0", since)
        seen.update(b for off, n in areas.extents for b in range(off // BLOCK_SIZE, (off + n) // BLOCK_SIZE))
        since = areas.change_id
    assert [c.wait(timeout=30) for c in children] == [0, 0]
    areas = lab.changed_areas(vm, "scsi0:0", since)
    seen.update(b for off, n in areas.extents for b in range(off // BLOCK_SIZE, (off + n) // BLOCK_SIZE))
    assert seen == set(range(500))
    assert lab.changed_areas(vm, "scsi0:0", first).extents == ((0, 500 * BLOCK_SIZE),)
    assert lab.change_tracking(vm, "scsi0:0").endswith("/750")
    with open(lab.disk_path(vm, "scsi0:0"), "rb") as f:
        f.seek(499 * BLOCK_SIZE)
        assert f.read(5) == b"child"


def test_it_runs_the_workload_on_powered_on_workload_vms_only_and_stops(lab):
    on = make_replica(lab, name="a_replica", power_on=True)
    off = make_replica(lab, name="b_replica")
    idle = make_replica(lab, name="c_replica", power_on=True)
    lab.set_vm_options(idle, workload=False)
    ids = {vm: {d.key: lab.change_tracking(vm, d.key) for d in lab.vm_config(vm).disks} for vm in (on, off, idle)}
    stop = threading.Event()
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            run_workload(lab.root, stop=stop, mib_per_s=4.0, block=(64 * KiB, 256 * KiB), seed=3, refresh_seconds=0.1)
        )
    )
    worker.start()
    time.sleep(0.3)
    lab.power_on(off)  # picked up at the next listing
    time.sleep(0.5)
    lab.power_off(on)  # dropped at once
    time.sleep(0.2)
    stop.set()
    worker.join(timeout=2)
    assert not worker.is_alive()
    assert set(result) == {on, off}
    assert 0.5 * MiB < result[on] < 5 * MiB  # about 4 MiB/s for ~0.8 s
    for vm in (on, off):
        changed = sum(n for key, cid in ids[vm].items() for _, n in lab.changed_areas(vm, key, cid).extents)
        assert changed > 0
    assert all(lab.changed_areas(idle, k, cid).extents == () for k, cid in ids[idle].items())
