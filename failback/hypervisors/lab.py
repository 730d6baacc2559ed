"""The lab hypervisor: a real platform over real disk files, the portal's embedded default.

Everything lives under one directory (the portal uses ``var/lab/``)::

    ROOT/lab.json                                 hosts, datastores (capacity), networks, id counter
    ROOT/vms/<vm_id>.json                         configuration and state of one VM
    ROOT/datastores/<ds>/<vm_id>/<disk>.img       the disk: a sparse raw file of the exact capacity
    ROOT/datastores/<ds>/<vm_id>/<disk>.ctk       its change log (little-endian uint32 block indices)
    ROOT/.lock                                    flock'd for every read-modify-write

Several processes use one lab at once (web, django-q2 workers, the workload generator), so every
change of state happens under an exclusive ``fcntl.flock`` on ``ROOT/.lock`` and JSON is replaced
atomically (temporary file + ``os.replace``); plain reads need no lock.

Behaviour follows vSphere where the portal can see it:

- Power operations refuse the state they would leave unchanged ("Powered on", "Powered off").
- ``shutdown_guest`` needs running tools and a powered-on guest. The guest then takes the VM's
  ``shutdown_seconds`` to power off; this is derived on read from the stored request time, so no
  process has to stay alive. With ``shutdown_hangs`` the guest never finishes.
- Change tracking works like CBT at 64 KiB granularity. A change id is ``"<epoch>/<records>"``: the
  epoch names one life of the disk's change log (a new one after seeding or toggling ``cbt``), the
  record count is the log's length. ``changed_areas(..., "*")`` returns the allocated areas of the
  disk, as vSphere does for the change id ``*``.
- Guest writes (``guest_write``) write the data first and then append the change record, both
  under the lock, so a change id read afterwards always covers every completed write.

No Django here: the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from .base import (
    POWERED_OFF,
    POWERED_ON,
    SUSPENDED,
    ChangedAreas,
    DiskSpec,
    HypervisorError,
    InsufficientSpace,
    Inventory,
    NicSpec,
    NotFound,
    VMConfig,
)

KiB, MiB, GiB = 1024, 1024**2, 1024**3
BLOCK_SIZE = 64 * KiB  # change tracking granularity
_RECORD = struct.Struct("<I")
_VM_ID = re.compile(r"vm-\d+")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Lab-only knobs settable with set_vm_options(), and their types.
OPTIONS = {
    "tools_installed": bool,
    "shutdown_seconds": float,
    "shutdown_hangs": bool,
    "workload": bool,
    "cbt": bool,
}

_held = threading.local()  # lock path -> [fd, depth] for this thread (the lock is re-entrant)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Exclusive flock on ``path``; re-entrant within a thread, exclusive between threads and processes."""
    key = str(path)
    held = getattr(_held, "locks", None)
    if held is None:
        held = _held.locks = {}
    entry = held.get(key)
    if entry is not None:
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held[key] = [fd, 1]
        try:
            yield
        finally:
            del held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _state_error(vm: dict, state: str) -> HypervisorError:
    label = {POWERED_ON: "Powered on", POWERED_OFF: "Powered off", SUSPENDED: "Suspended"}[state]
    return HypervisorError(
        f"{vm['name']} ({vm['vm_id']}): the attempted operation cannot be performed in the current state ({label})."
    )


def _settle(vm: dict, now: float | None = None) -> dict:
    """Apply a guest shutdown whose time is up: the VM is then powered off."""
    requested = vm.get("shutdown_requested_at")
    if vm["power"] == POWERED_ON and requested is not None and not vm["shutdown_hangs"]:
        if (time.time() if now is None else now) >= requested + vm["shutdown_seconds"]:
            vm["power"] = POWERED_OFF
            vm["shutdown_requested_at"] = None
    return vm


def _extents(blocks: Sequence[int] | set[int], capacity: int) -> tuple[tuple[int, int], ...]:
    """Sorted, merged (offset, length) extents of 64 KiB blocks, clipped to the disk size."""
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        start = b * BLOCK_SIZE
        if start >= capacity:
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += BLOCK_SIZE
        else:
            out.append([start, BLOCK_SIZE])
    if out and out[-1][0] + out[-1][1] > capacity:
        out[-1][1] = capacity - out[-1][0]
    return tuple((o, n) for o, n in out)


class LabHypervisor:
    """A hypervisor over a directory of real sparse disk files; see the module docstring."""

    name = "lab"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "vms").mkdir(exist_ok=True)
        (self.root / "datastores").mkdir(exist_ok=True)
        self._lock_path = self.root / ".lock"

    def __repr__(self) -> str:
        return f"LabHypervisor({str(self.root)!r})"

    # -- storage ---------------------------------------------------------------
    def _locked(self):
        return _flock(self._lock_path)

    def _lab(self) -> dict:
        try:
            with open(self.root / "lab.json", encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return {"hosts": [], "datastores": {}, "networks": [], "next_vm": 1, "seeded": None}

    def _save_lab(self, lab: dict) -> None:
        _write_json(self.root / "lab.json", lab)

    def _vm_file(self, vm_id: str) -> Path:
        if not isinstance(vm_id, str) or not _VM_ID.fullmatch(vm_id):
            raise NotFound(f"No virtual machine {vm_id!r} in the lab.")
        return self.root / "vms" / f"{vm_id}.json"

    def _vm(self, vm_id: str) -> dict:
        try:
            with open(self._vm_file(vm_id), encoding="utf-8") as f:
                return _settle(json.load(f))
        except FileNotFoundError:
            raise NotFound(f"No virtual machine {vm_id!r} in the lab.") from None

    def _save_vm(self, vm: dict) -> None:
        _write_json(self._vm_file(vm["vm_id"]), vm)

    def _vm_ids(self) -> list[str]:
        ids = [p.stem for p in (self.root / "vms").glob("vm-*.json")]
        return sorted((i for i in ids if _VM_ID.fullmatch(i)), key=lambda i: int(i[3:]))

    def _vms(self) -> list[dict]:
        vms = []
        for vm_id in self._vm_ids():
            try:
                vms.append(self._vm(vm_id))
            except NotFound:  # deleted by another process meanwhile
                pass
        return vms

    def _disk(self, vm: dict, disk_key: str) -> dict:
        for d in vm["disks"]:
            if d["key"] == disk_key:
                return d
        raise NotFound(f"{vm['name']} ({vm['vm_id']}) has no disk {disk_key!r}.")

    def _vm_dir(self, datastore: str, vm_id: str) -> Path:
        return self.root / "datastores" / datastore / vm_id

    def _disk_file(self, vm: dict, disk: dict, suffix: str = ".img") -> Path:
        return self._vm_dir(disk["datastore"], vm["vm_id"]) / (disk["key"].replace(":", "-") + suffix)

    def _reset_tracking(self, vm: dict) -> None:
        """Start a new change-log epoch for every disk (empty logs); the caller saves the VM."""
        for d in vm["disks"]:
            d["ctk_epoch"] = uuid.uuid4().hex[:12]
            with open(self._disk_file(vm, d, ".ctk"), "wb"):
                pass

    def _provisioned(self, vms: list[dict]) -> dict[str, int]:
        used: dict[str, int] = {}
        for vm in vms:
            for d in vm["disks"]:
                used[d["datastore"]] = used.get(d["datastore"], 0) + d["capacity_bytes"]
        return used

    # -- lab setup (not part of the Hypervisor protocol) ---------------------------
    def add_host(self, name: str) -> None:
        with self._locked():
            lab = self._lab()
            if name in lab["hosts"]:
                raise HypervisorError(f"Host {name!r} already exists.")
            lab["hosts"].append(name)
            self._save_lab(lab)

    def add_datastore(self, name: str, capacity_bytes: int) -> None:
        if not _SAFE_NAME.fullmatch(name):
            raise HypervisorError(f"Invalid datastore name {name!r}.")
        if capacity_bytes <= 0:
            raise HypervisorError("A datastore needs a positive capacity.")
        with self._locked():
            lab = self._lab()
            if name in lab["datastores"]:
                raise HypervisorError(f"Datastore {name!r} already exists.")
            lab["datastores"][name] = int(capacity_bytes)
            (self.root / "datastores" / name).mkdir(exist_ok=True)
            self._save_lab(lab)

    HOST_STATES = ("connected", "maintenance", "disconnected", "notResponding")

    def set_host_state(self, name: str, state: str) -> None:
        """Lab knob: put a host into maintenance mode or cut it off (as vSphere names the states)."""
        if state not in self.HOST_STATES:
            raise ValueError(f"Unknown host state {state!r}; one of {', '.join(self.HOST_STATES)}")
        with self._locked():
            lab = self._lab()
            if name not in lab["hosts"]:
                raise NotFound(f"No host named {name!r} in the lab.")
            lab.setdefault("host_states", {})[name] = state
            self._save_lab(lab)

    def host_states(self) -> dict[str, str]:
        lab = self._lab()
        return {h: lab.get("host_states", {}).get(h, "connected") for h in lab["hosts"]}

    def add_network(self, name: str) -> None:
        with self._locked():
            lab = self._lab()
            if name in lab["networks"]:
                raise HypervisorError(f"Network {name!r} already exists.")
            lab["networks"].append(name)
            self._save_lab(lab)

    def create_vm(
        self,
        name: str,
        *,
        host: str,
        datastore: str,
        disks: Sequence[int],
        networks: Sequence[str | None] = (),
        cpus: int = 2,
        memory_mb: int = 4096,
        guest_os: str = "otherLinux64Guest",
        firmware: str = "efi",
        tools_installed: bool = True,
        shutdown_seconds: float = 5.0,
        shutdown_hangs: bool = False,
        workload: bool = False,
        cbt: bool = True,
        power_on: bool = False,
    ) -> str:
        """Create a VM with empty sparse disks of the given capacities (bytes); return its id."""
        vm = {
            "name": name, "host": host, "datastore": datastore, "cpus": int(cpus),
            "memory_mb": int(memory_mb), "guest_os": guest_os, "firmware": firmware,
            "tools_installed": bool(tools_installed), "shutdown_seconds": float(shutdown_seconds),
            "shutdown_hangs": bool(shutdown_hangs), "workload": bool(workload), "cbt": bool(cbt),
            "disks": [
                {"key": f"scsi0:{i}", "capacity_bytes": int(c), "datastore": datastore, "thin": True}
                for i, c in enumerate(disks)
            ],
            "nics": [{"key": f"nic{i}", "network": n} for i, n in enumerate(networks)],
            "power": POWERED_ON if power_on else POWERED_OFF,
        }
        return self._create(vm)

    def _create(self, vm: dict) -> str:
        with self._locked():
            lab = self._lab()
            if vm["host"] not in lab["hosts"]:
                raise NotFound(f"No host {vm['host']!r} in the lab.")
            for ds in {vm["datastore"], *(d["datastore"] for d in vm["disks"])}:
                if ds not in lab["datastores"]:
                    raise NotFound(f"No datastore {ds!r} in the lab.")
            for nic in vm["nics"]:
                if nic["network"] is not None and nic["network"] not in lab["networks"]:
                    raise NotFound(f"No network {nic['network']!r} in the lab.")
            for d in vm["disks"]:
                if d["capacity_bytes"] <= 0:
                    raise HypervisorError(f"Disk {d['key']}: capacity must be positive.")
            existing = self._vms()
            if any(v["name"] == vm["name"] for v in existing):
                raise HypervisorError(f"The name '{vm['name']}' already exists.")
            used = self._provisioned(existing)
            needed: dict[str, int] = {}
            for d in vm["disks"]:
                needed[d["datastore"]] = needed.get(d["datastore"], 0) + d["capacity_bytes"]
            for ds, n in needed.items():
                free = lab["datastores"][ds] - used.get(ds, 0)
                if n > free:
                    raise InsufficientSpace(
                        f"Insufficient disk space on datastore '{ds}': {n} bytes needed, {max(free, 0)} free."
                    )
            vm_id = f"vm-{lab['next_vm']}"
            lab["next_vm"] += 1
            self._save_lab(lab)  # the id is spent even if the rest fails
            vm.update(vm_id=vm_id, shutdown_requested_at=None, created_at=time.time())
            made: list[Path] = []
            try:
                for d in vm["disks"]:
                    folder = self._vm_dir(d["datastore"], vm_id)
                    if folder not in made:
                        folder.mkdir(parents=True)
                        made.append(folder)
                    with open(self._disk_file(vm, d), "wb") as f:
                        f.truncate(d["capacity_bytes"])  # sparse: no blocks allocated
                self._reset_tracking(vm)
                self._save_vm(vm)
            except BaseException:
                for folder in made:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            return vm_id

    # -- inventory -----------------------------------------------------------------
    def inventory(self) -> Inventory:
        lab = self._lab()
        vms = self._vms()
        used = self._provisioned(vms)
        return Inventory(
            hosts=tuple(lab["hosts"]),
            datastores={ds: cap - used.get(ds, 0) for ds, cap in lab["datastores"].items()},
            networks=tuple(lab["networks"]),
            vms=tuple(self._config(vm) for vm in vms),
        )

    def vm_config(self, vm_id: str) -> VMConfig:
        return self._config(self._vm(vm_id))

    @staticmethod
    def _config(vm: dict) -> VMConfig:
        return VMConfig(
            vm_id=vm["vm_id"], name=vm["name"], host=vm["host"], cpus=vm["cpus"],
            memory_mb=vm["memory_mb"], guest_os=vm["guest_os"], firmware=vm["firmware"],
            disks=tuple(DiskSpec(d["key"], d["capacity_bytes"], d["datastore"], d["thin"]) for d in vm["disks"]),
            nics=tuple(NicSpec(n["key"], n["network"]) for n in vm["nics"]),
            tools_installed=vm["tools_installed"], datastore=vm["datastore"],
        )

    def find_vm(self, name: str) -> str:
        """The id of the VM with this name (lab helper)."""
        for vm in self._vms():
            if vm["name"] == name:
                return vm["vm_id"]
        raise NotFound(f"No virtual machine named {name!r} in the lab.")

    def vm_meta(self, vm_id: str) -> dict:
        """Lab state of a VM for display: power, tools and the lab-only knobs."""
        vm = self._vm(vm_id)
        return {
            "power_state": vm["power"],
            "tools_installed": vm["tools_installed"],
            "tools_running": vm["tools_installed"] and vm["power"] == POWERED_ON,
            "shutdown_requested_at": vm["shutdown_requested_at"],
            "shutdown_seconds": vm["shutdown_seconds"],
            "shutdown_hangs": vm["shutdown_hangs"],
            "workload": vm["workload"],
            "cbt": vm["cbt"],
        }

    def set_vm_options(self, vm_id: str, **opts) -> None:
        """Change lab-only knobs (see OPTIONS). Toggling ``cbt`` starts a new change-log epoch."""
        unknown = set(opts) - set(OPTIONS)
        if unknown:
            raise ValueError(f"Unknown lab VM option(s): {', '.join(sorted(unknown))}")
        if "shutdown_seconds" in opts and float(opts["shutdown_seconds"]) < 0:
            raise ValueError("shutdown_seconds must not be negative")
        with self._locked():
            vm = self._vm(vm_id)
            cbt_before = vm["cbt"]
            for k, v in opts.items():
                vm[k] = OPTIONS[k](v)
            if vm["cbt"] != cbt_before:
                self._reset_tracking(vm)
            self._save_vm(vm)

    # -- lifecycle -----------------------------------------------------------------
    def create_vm_like(
        self,
        source_vm_id: str,
        *,
        name: str,
        host: str,
        datastore: str,
        network_map: dict[str, str | None],
        resource_pool: str | None = None,
        folder: str | None = None,
        owner_tag: str | None = None,
    ) -> str:
        """The lab has no resource pools or folders: ``resource_pool`` and ``folder`` are ignored.

        Same CPUs, memory, guest OS, firmware, tools and workload flag; empty sparse disks of the
        same sizes on ``datastore``; NICs mapped through ``network_map``; powered off.

        A source NIC whose network is missing from ``network_map`` is refused (HypervisorError):
        connecting a production VM to a DR network by default is never what the admin meant.
        """
        src = self._vm(source_vm_id)
        nics = []
        for n in src["nics"]:
            if n["network"] is None:
                target = None
            elif n["network"] in network_map:
                target = network_map[n["network"]]
            else:
                raise HypervisorError(f"No mapping given for network {n['network']!r} of {src['name']}.")
            nics.append({"key": n["key"], "network": target})
        vm = {
            "name": name, "host": host, "datastore": datastore,
            **{k: src[k] for k in ("cpus", "memory_mb", "guest_os", "firmware", "tools_installed",
                                   "shutdown_seconds", "workload")},
            "shutdown_hangs": False, "cbt": True, "power": POWERED_OFF,
            "disks": [
                {"key": d["key"], "capacity_bytes": d["capacity_bytes"], "datastore": datastore, "thin": True}
                for d in src["disks"]
            ],
            "nics": nics,
            "created_from": source_vm_id,
            "owner_tag": owner_tag,
        }
        return self._create(vm)

    def vm_owner(self, vm_id: str) -> str | None:
        return self._vm(vm_id).get("owner_tag")

    def find_owned_vm(self, owner_tag: str) -> str | None:
        return next((vm["vm_id"] for vm in self._vms() if owner_tag and vm.get("owner_tag") == owner_tag), None)

    def close(self) -> None:
        """Nothing to release: the lab keeps no session."""

    def power_states(self) -> dict[str, str]:
        """Every VM's power state (vm id -> state), read in one pass."""
        return {vm["vm_id"]: _settle(vm)["power"] for vm in self._vms()}

    def delete_vm(self, vm_id: str) -> None:
        """Unregister the VM and delete its disks; refused unless it is powered off."""
        with self._locked():
            vm = self._vm(vm_id)
            if vm["power"] != POWERED_OFF:
                raise _state_error(vm, vm["power"])
            os.unlink(self._vm_file(vm_id))
            for ds in {d["datastore"] for d in vm["disks"]}:
                shutil.rmtree(self._vm_dir(ds, vm_id), ignore_errors=True)

    def power_state(self, vm_id: str) -> str:
        return self._vm(vm_id)["power"]

    def power_on(self, vm_id: str) -> None:
        """Power on a powered-off VM or resume a suspended one."""
        with self._locked():
            vm = self._vm(vm_id)
            if vm["power"] == POWERED_ON:
                raise _state_error(vm, POWERED_ON)
            vm["power"], vm["shutdown_requested_at"] = POWERED_ON, None
            self._save_vm(vm)

    def power_off(self, vm_id: str) -> None:
        """Hard power off, at once (also from suspended, or during a guest shutdown)."""
        with self._locked():
            vm = self._vm(vm_id)
            if vm["power"] == POWERED_OFF:
                raise _state_error(vm, POWERED_OFF)
            vm["power"], vm["shutdown_requested_at"] = POWERED_OFF, None
            self._save_vm(vm)

    def suspend(self, vm_id: str) -> None:
        with self._locked():
            vm = self._vm(vm_id)
            if vm["power"] != POWERED_ON:
                raise _state_error(vm, vm["power"])
            vm["power"], vm["shutdown_requested_at"] = SUSPENDED, None
            self._save_vm(vm)

    def tools_running(self, vm_id: str) -> bool:
        vm = self._vm(vm_id)
        return vm["tools_installed"] and vm["power"] == POWERED_ON

    def shutdown_guest(self, vm_id: str) -> None:
        """Ask the guest to shut down; it powers off ``shutdown_seconds`` later (never if it hangs).
        A second request while one is pending is a no-op."""
        with self._locked():
            vm = self._vm(vm_id)
            if vm["power"] != POWERED_ON:
                raise _state_error(vm, vm["power"])
            if not vm["tools_installed"]:
                raise HypervisorError(
                    f"{vm['name']} ({vm_id}): cannot complete operation because VMware Tools is not running in this virtual machine."
                )
            if vm["shutdown_requested_at"] is None:
                vm["shutdown_requested_at"] = time.time()
                self._save_vm(vm)

    # -- disks ---------------------------------------------------------------------
    def disk_path(self, vm_id: str, disk_key: str) -> str:
        vm = self._vm(vm_id)
        return str(self._disk_file(vm, self._disk(vm, disk_key)))

    def guest_write(self, vm_id: str, disk_key: str, offset: int, data: bytes) -> None:
        """The guest writes ``data`` at ``offset``: the bytes land on the disk and change tracking
        records the 64 KiB blocks touched. Refused unless the VM is powered on."""
        with self._locked():
            vm = self._vm(vm_id)
            if vm["power"] != POWERED_ON:
                raise HypervisorError(f"{vm['name']} ({vm_id}): the guest is not running ({vm['power']}).")
            disk = self._disk(vm, disk_key)
            if offset < 0 or offset + len(data) > disk["capacity_bytes"]:
                raise HypervisorError(
                    f"Write of {len(data)} bytes at {offset} is outside disk {disk_key} ({disk['capacity_bytes']} bytes)."
                )
            if not data:
                return
            fd = os.open(self._disk_file(vm, disk), os.O_WRONLY)
            try:
                view, pos = memoryview(data), offset
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
            finally:
                os.close(fd)
            if vm["cbt"]:
                first, last = offset // BLOCK_SIZE, (offset + len(data) - 1) // BLOCK_SIZE
                record = b"".join(_RECORD.pack(b) for b in range(first, last + 1))
                fd = os.open(self._disk_file(vm, disk, ".ctk"), os.O_WRONLY | os.O_APPEND)
                try:
                    while record:
                        record = record[os.write(fd, record):]
                finally:
                    os.close(fd)

    def change_tracking(self, vm_id: str, disk_key: str) -> str | None:
        with self._locked():
            vm = self._vm(vm_id)
            disk = self._disk(vm, disk_key)
            if not vm["cbt"]:
                return None
            size = os.stat(self._disk_file(vm, disk, ".ctk")).st_size
            return f"{disk['ctk_epoch']}/{size // _RECORD.size}"

    def changed_areas(self, vm_id: str, disk_key: str, since_change_id: str) -> ChangedAreas:
        """Extents written since the change id (64 KiB-rounded, clipped to the disk), and the current
        id. ``"*"`` means "since the disk was created": the allocated areas of the file."""
        with self._locked():
            vm = self._vm(vm_id)
            disk = self._disk(vm, disk_key)
            if not vm["cbt"]:
                raise HypervisorError(f"{vm['name']} ({vm_id}): change tracking is not enabled.")
            log = self._disk_file(vm, disk, ".ctk")
            with open(log, "rb") as f:
                raw = f.read()
            records = len(raw) // _RECORD.size
            current = f"{disk['ctk_epoch']}/{records}"
            if since_change_id == "*":
                return ChangedAreas(current, self._allocated(self._disk_file(vm, disk), disk["capacity_bytes"]))
            epoch, _, count = str(since_change_id).partition("/")
            if not count.isdigit():
                raise HypervisorError(f"Invalid change id {since_change_id!r} for disk {disk_key} of {vm['name']}.")
            if epoch != disk["ctk_epoch"] or int(count) > records:
                raise HypervisorError(
                    f"Change id {since_change_id!r} does not belong to disk {disk_key} of {vm['name']} "
                    f"(change tracking was reset or the id is from another disk); current id is {current!r}."
                )
            start = int(count) * _RECORD.size
            blocks = struct.unpack(f"<{records - int(count)}I", raw[start:records * _RECORD.size])
            return ChangedAreas(current, _extents(blocks, disk["capacity_bytes"]))

    @staticmethod
    def _allocated(path: Path, capacity: int) -> tuple[tuple[int, int], ...]:
        blocks: set[int] = set()
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = 0
            while pos < capacity:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), capacity)
                blocks.update(range(data // BLOCK_SIZE, (hole - 1) // BLOCK_SIZE + 1))
                pos = hole
        finally:
            os.close(fd)
        return _extents(blocks, capacity)


# -- the demo lab ---------------------------------------------------------------------
DEMO_WORKLOADS = [  # name, guest OS, firmware, networks
    ("app-erp-01", "windows2019srv_64Guest", "efi", ("dr-net",)),
    ("db-sql-01", "windows2019srv_64Guest", "efi", ("dr-net",)),
    ("web-01", "ubuntu64Guest", "bios", ("dr-dmz",)),
    ("app-crm-01", "rhel8_64Guest", "efi", ("dr-net", "dr-dmz")),
    ("db-pg-01", "rhel8_64Guest", "efi", ("dr-net",)),
    ("web-02", "ubuntu64Guest", "bios", ("dr-dmz",)),
    ("file-01", "windows2019srv_64Guest", "efi", ("dr-net",)),
    ("mail-01", "windows2019srv_64Guest", "efi", ("dr-net", "dr-dmz")),
    ("app-hr-01", "rhel8_64Guest", "efi", ("dr-net",)),
    ("db-ora-01", "oracleLinux8_64Guest", "efi", ("dr-net",)),
    ("ad-dc-01", "windows2019srv_64Guest", "efi", ("dr-net",)),
    ("app-bi-01", "ubuntu64Guest", "efi", ("dr-net",)),
]
_DEMO_CAPACITIES_MIB = [256] * 5 + [384] * 4 + [512] * 3 + [768] * 2 + [1024, 2048, 3072]
DEMO_DATA_BUDGET = int(1.25 * GiB)  # allocated data across the whole lab at scale=1


def _round_down(n: int, unit: int) -> int:
    return n // unit * unit


def seed_demo(root: str | os.PathLike[str], *, count: int = 12, scale: float = 1.0, seed: int = 1) -> list[str]:
    """Create the two-site demo lab in ``root`` and return the ids of its ``count`` replica VMs.

    Production: hosts esx-prod-01/02, datastores prod-ds-01/02 (200 GiB x scale each), networks
    prod-net/prod-dmz. DR: hosts esx-dr-01/02, datastore dr-ds-01 (400 GiB x scale), networks
    dr-net/dr-dmz. Replicas ``<workload>_replica`` run on the DR hosts, powered on with the workload
    flag; every 4th has no tools, the 2nd hangs on guest shutdown, the 3rd has change tracking off.
    Each has 1-3 disks of 256 MiB-3 GiB (x scale); 10-30 % of each disk holds random data in
    scattered 1-4 MiB extents (x scale), scaled down uniformly if the lab would exceed 1.25 GiB
    x scale. Seed data is written directly and the change logs start empty. Deterministic for a seed.

    Idempotent: on a root this function seeded before it is a no-op returning the same ids. A root
    that holds anything else is refused (HypervisorError); so is a half-seeded one (delete it).
    """
    if count < 1 or scale <= 0:
        raise ValueError("count must be >= 1 and scale > 0")
    rng = random.Random(seed)
    lab_hv = LabHypervisor(root)
    with lab_hv._locked():
        lab = lab_hv._lab()
        if lab.get("seeded"):
            return list(lab["seeded"]["replicas"])
        if lab["hosts"] or lab["datastores"] or lab["networks"] or lab_hv._vm_ids():
            raise HypervisorError(f"Refusing to seed {lab_hv.root}: it already holds a lab that seed_demo did not create.")
        for h in ("esx-prod-01", "esx-prod-02", "esx-dr-01", "esx-dr-02"):
            lab_hv.add_host(h)
        unit = 64 * KiB
        for ds, cap in (("prod-ds-01", 200 * GiB), ("prod-ds-02", 200 * GiB), ("dr-ds-01", 400 * GiB)):
            lab_hv.add_datastore(ds, max(_round_down(int(cap * scale), unit), GiB))
        for n in ("prod-net", "prod-dmz", "dr-net", "dr-dmz"):
            lab_hv.add_network(n)

        # Plan every VM first, so that the data budget can be applied across the whole lab.
        plans = []
        for i in range(count):
            if i < len(DEMO_WORKLOADS):
                workload, guest_os, firmware, nets = DEMO_WORKLOADS[i]
            else:
                workload, guest_os, firmware, nets = f"app-{i + 1:02d}", "ubuntu64Guest", "efi", ("dr-net",)
            disks = [
                max(_round_down(int(rng.choice(_DEMO_CAPACITIES_MIB) * MiB * scale), unit), MiB)
                for _ in range(rng.choice([1, 1, 2, 2, 3]))
            ]
            plans.append({
                "name": f"{workload}_replica", "guest_os": guest_os, "firmware": firmware, "networks": nets,
                "host": ("esx-dr-01", "esx-dr-02")[i % 2], "disks": disks,
                "fractions": [rng.uniform(0.10, 0.30) for _ in disks],
                "cpus": rng.choice([2, 2, 4, 4, 8]), "memory_mb": rng.choice([2048, 4096, 8192, 16384]),
                "tools": i % 4 != 3, "hangs": i == 1, "cbt": i != 2,
                "shutdown_seconds": float(rng.randint(2, 10)),
            })
        wanted = sum(c * f for p in plans for c, f in zip(p["disks"], p["fractions"]))
        factor = min(1.0, DEMO_DATA_BUDGET * scale / wanted)

        ids = []
        for p in plans:
            vm_id = lab_hv.create_vm(
                p["name"], host=p["host"], datastore="dr-ds-01", disks=p["disks"], networks=p["networks"],
                cpus=p["cpus"], memory_mb=p["memory_mb"], guest_os=p["guest_os"], firmware=p["firmware"],
                tools_installed=p["tools"], shutdown_seconds=p["shutdown_seconds"], shutdown_hangs=p["hangs"],
                workload=True, cbt=p["cbt"], power_on=True,
            )
            vm = lab_hv._vm(vm_id)
            for disk, frac in zip(vm["disks"], p["fractions"]):
                _seed_disk(lab_hv._disk_file(vm, disk), disk["capacity_bytes"], frac * factor, scale, rng)
            lab_hv._reset_tracking(vm)  # seed data is not a change
            lab_hv._save_vm(vm)
            ids.append(vm_id)

        lab = lab_hv._lab()
        lab["seeded"] = {"seed": seed, "count": count, "scale": scale, "replicas": ids}
        lab_hv._save_lab(lab)
        return ids


def _seed_disk(path: Path, capacity: int, fraction: float, scale: float, rng: random.Random) -> None:
    """Write random data in scattered extents covering about ``fraction`` of the disk."""
    page = 4 * KiB
    slot = max(_round_down(int(4 * MiB * scale), page), 64 * KiB)
    slots = capacity // slot
    if slots == 0:
        return
    target = int(capacity * fraction)
    order = rng.sample(range(slots), slots)
    written = 0
    with open(path, "r+b") as f:
        for s in order:
            if written >= target:
                break
            size = min(slot, max(_round_down(int(rng.uniform(1, 4) * MiB * scale), page), page))
            offset = s * slot + _round_down(rng.randrange(0, slot - size + 1), page)
            f.seek(offset)
            f.write(rng.randbytes(size))
            written += size


# -- the workload generator -------------------------------------------------------------
def run_workload(
    root: str | os.PathLike[str],
    *,
    stop: threading.Event,
    mib_per_s: float = 1.0,
    block: tuple[int, int] = (64 * KiB, 1 * MiB),
    seed: int | None = None,
    refresh_seconds: float = 1.0,
) -> dict[str, int]:
    """Write random data through ``guest_write`` to every powered-on VM with the workload flag, at
    about ``mib_per_s`` per VM, in 4 KiB-aligned writes of ``block`` (min, max) bytes, until ``stop``
    is set. VMs are re-listed every ``refresh_seconds``; one powered off or deleted meanwhile is
    skipped. Returns bytes written per VM id.
    """
    if mib_per_s <= 0:
        raise ValueError("mib_per_s must be positive")
    rng = random.Random(seed)
    hv = LabHypervisor(root)
    rate = mib_per_s * MiB
    lo, hi = max(4 * KiB, block[0]), max(4 * KiB, block[1], block[0])
    due: dict[str, float] = {}
    written: dict[str, int] = {}
    next_refresh = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_refresh:
            running = set()
            for vm in hv._vms():
                if vm["workload"] and vm["power"] == POWERED_ON and vm["disks"]:
                    running.add(vm["vm_id"])
            for vm_id in list(due):
                if vm_id not in running:
                    del due[vm_id]
            for vm_id in running - set(due):
                due[vm_id] = now + rng.uniform(0, 0.05)
            next_refresh = now + refresh_seconds
        if not due:
            stop.wait(max(0.0, min(0.2, next_refresh - now)))
            continue
        vm_id, when = min(due.items(), key=lambda kv: kv[1])
        if when > now:
            stop.wait(min(when, next_refresh) - now)
            continue
        try:
            vm = hv._vm(vm_id)
            disk = rng.choice(vm["disks"])
            cap = disk["capacity_bytes"]
            size = min(_round_down(rng.randint(lo, hi), 4 * KiB), _round_down(cap, 4 * KiB)) or min(cap, 4 * KiB)
            offset = _round_down(rng.randrange(0, cap - size + 1), 4 * KiB)
            hv.guest_write(vm_id, disk["key"], offset, rng.randbytes(size))
        except HypervisorError:  # powered off, suspended or deleted since the last listing
            del due[vm_id]
            continue
        written[vm_id] = written.get(vm_id, 0) + size
        due[vm_id] = max(when, now - 1.0) + size / rate  # no catch-up bursts after a stall
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m failback.hypervisors.lab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("seed", help="create the two-site demo lab")
    p.add_argument("root")
    p.add_argument("--count", type=int, default=12)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("workload", help="write to powered-on workload VMs until interrupted")
    p.add_argument("root")
    p.add_argument("--mib-per-s", type=float, default=1.0, help="per VM (default 1)")
    p.add_argument("--seed", type=int, default=None)
    p = sub.add_parser("show", help="print the lab's VMs")
    p.add_argument("root")
    args = parser.parse_args(argv)

    if args.command == "seed":
        t = time.monotonic()
        ids = seed_demo(args.root, count=args.count, scale=args.scale, seed=args.seed)
        print(f"{len(ids)} replicas in {args.root} ({time.monotonic() - t:.1f} s): {' '.join(ids)}")
    elif args.command == "workload":
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        written = run_workload(args.root, stop=stop, mib_per_s=args.mib_per_s, seed=args.seed)
        print(f"wrote {sum(written.values()) / MiB:.1f} MiB to {len(written)} VMs")
    else:
        hv = LabHypervisor(args.root)
        inv = hv.inventory()
        for ds, free in inv.datastores.items():
            print(f"datastore {ds}: {free / GiB:.1f} GiB free")
        for vm in inv.vms:
            meta = hv.vm_meta(vm.vm_id)
            disks = ", ".join(f"{d.key} {d.capacity_bytes / MiB:.0f} MiB" for d in vm.disks)
            print(f"{vm.vm_id:7} {vm.name:22} {vm.host:12} {meta['power_state']:11} "
                  f"tools={'yes' if vm.tools_installed else 'no'} cbt={'on' if meta['cbt'] else 'off'} [{disks}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
