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
- ``guest_ready`` (a plan's gate between boot groups) needs tools and power, and ``boot_seconds``
  (a knob, 0 by default) since the last power-on: a VM without tools is never ready.
- Change tracking works like CBT at 64 KiB granularity. A change id is ``"<epoch>/<records>"``: the
  epoch names one life of the disk's change log (a new one after seeding or toggling ``cbt``), the
  record count is the log's length. ``changed_areas(..., "*")`` returns the allocated areas of the
  disk, as vSphere does for the change id ``*``.
- Disks grow (``extend_disk``, the new space a hole) and are hot-added (``add_disk``) while the VM
  runs, as in vCenter; they never shrink.
- Guest writes (``guest_write``) write the data first and then append the change record, both
  under the lock, so a change id read afterwards always covers every completed write.

Disk data and change tracking are in ``lab_disks`` (composed into ``LabHypervisor``). The demo lab
(``seed_demo``), the workload generator (``run_workload``) and the command line live in ``lab_demo``,
on this module's public methods.

No Django here: the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import (
    POWERED_OFF,
    POWERED_ON,
    SUSPENDED,
    DiskSpec,
    HypervisorError,
    InsufficientSpace,
    Inventory,
    NicSpec,
    NotFound,
    Placement,
    VMConfig,
)
from .lab_disks import BLOCK_SIZE, LabDisks
from .lab_files import _flock, _write_json

__all__ = ["BLOCK_SIZE", "OPTIONS", "LabHypervisor"]

KiB, MiB, GiB = 1024, 1024**2, 1024**3
_VM_ID = re.compile(r"vm-\d+")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Lab-only knobs settable with set_vm_options(), and their types.
OPTIONS = {
    "tools_installed": bool,
    "shutdown_seconds": float,
    "shutdown_hangs": bool,
    "boot_seconds": float,
    "workload": bool,
    "cbt": bool,
}


def _state_error(vm: dict, state: str) -> HypervisorError:
    label = {POWERED_ON: "Powered on", POWERED_OFF: "Powered off", SUSPENDED: "Suspended"}[state]
    return HypervisorError(
        f"{vm['name']} ({vm['vm_id']}): the attempted operation cannot be performed in the current state ({label})."
    )


def _settle(vm: dict, now: float | None = None) -> dict:
    """Apply a guest shutdown whose time is up: the VM is then powered off."""
    requested = vm.get("shutdown_requested_at")
    if (
        vm["power"] == POWERED_ON
        and requested is not None
        and not vm["shutdown_hangs"]
        and (time.time() if now is None else now) >= requested + vm["shutdown_seconds"]
    ):
        vm["power"] = POWERED_OFF
        vm["shutdown_requested_at"] = None
    return vm


class LabHypervisor(LabDisks):
    """A hypervisor over a directory of real sparse disk files; see the module docstring."""

    name = "lab"

    def __init__(self, root: str | os.PathLike[str], transport: str = "direct") -> None:
        # The disks are local files: the engine opens them (direct), or nbdkit's file plugin serves
        # them and the engine reaches them over NBD (nbd: the same path as vSphere's vddk exports).
        if transport not in ("direct", "nbd"):
            raise HypervisorError(f"The lab's transport is 'direct' or 'nbd', not {transport!r}.")
        self.transport = transport
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "vms").mkdir(exist_ok=True)
        (self.root / "datastores").mkdir(exist_ok=True)
        self._lock_path = self.root / ".lock"

    def __repr__(self) -> str:
        return f"LabHypervisor({str(self.root)!r})"

    @property
    def where(self) -> str:
        return f"Lab hypervisor at {self.root}"

    def about(self) -> str:
        """The lab's root and size, read from its files (the "Test connection" of the lab)."""
        lab = self._lab()
        return f"{self.where} ({len(lab['hosts'])} hosts, {len(self._vm_ids())} VMs)"

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
    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the lab's lock across several calls, so that other processes see all of them or none
        (re-entrant within this thread: the calls made inside take it again)."""
        return self._locked()

    def seeded(self) -> dict | None:
        """What ``mark_seeded`` recorded about the lab's creation, or None."""
        return self._lab().get("seeded")

    def mark_seeded(self, record: dict) -> None:
        """Record how the lab was created (``lab_demo.seed_demo`` stores its parameters and replica ids)."""
        with self._locked():
            lab = self._lab()
            lab["seeded"] = dict(record)
            self._save_lab(lab)

    def reset_change_tracking(self, vm_id: str) -> None:
        """Start a new change-log epoch on every disk of the VM: what the disks hold now is not a change,
        and change ids read before are refused from now on (as after toggling ``cbt``)."""
        with self._locked():
            vm = self._vm(vm_id)
            self._reset_tracking(vm)
            self._save_vm(vm)

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
            "name": name,
            "host": host,
            "datastore": datastore,
            "cpus": int(cpus),
            "memory_mb": int(memory_mb),
            "guest_os": guest_os,
            "firmware": firmware,
            "tools_installed": bool(tools_installed),
            "shutdown_seconds": float(shutdown_seconds),
            "shutdown_hangs": bool(shutdown_hangs),
            "workload": bool(workload),
            "cbt": bool(cbt),
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
            self._check_new(lab, vm)
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

    def _check_new(self, lab: dict, vm: dict) -> None:
        """Refuse a VM whose host, datastores or networks do not exist, whose name is taken, or whose
        disks do not fit (capacities add up per datastore: the lab provisions every disk in full)."""
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
            vm_id=vm["vm_id"],
            name=vm["name"],
            host=vm["host"],
            cpus=vm["cpus"],
            memory_mb=vm["memory_mb"],
            guest_os=vm["guest_os"],
            firmware=vm["firmware"],
            disks=tuple(DiskSpec(d["key"], d["capacity_bytes"], d["datastore"], d["thin"]) for d in vm["disks"]),
            nics=tuple(NicSpec(n["key"], n["network"]) for n in vm["nics"]),
            tools_installed=vm["tools_installed"],
            datastore=vm["datastore"],
        )

    def find_vm(self, name: str) -> str:
        """The id of the VM with this name (lab helper)."""
        for vm in self._vms():
            if vm["name"] == name:
                return vm["vm_id"]
        raise NotFound(f"No virtual machine named {name!r} in the lab.")

    def placement(self) -> Placement:
        """The lab has hosts and datastores only: no datacenters, clusters, pools or folders."""
        return Placement()

    def custom_attribute_values(self, attribute: str) -> dict[str, str]:
        """The lab has no custom attributes: replicas are found by their name suffix."""
        return {}

    def vm_meta(self, vm_id: str) -> dict[str, Any]:
        """Guest hints (``shutdown_seconds``, ``shutdown_hangs``) and the rest of the lab's state of the
        VM, for display: power, tools and the lab-only knobs."""
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
            "name": name,
            "host": host,
            "datastore": datastore,
            **{
                k: src[k]
                for k in (
                    "cpus",
                    "memory_mb",
                    "guest_os",
                    "firmware",
                    "tools_installed",
                    "shutdown_seconds",
                    "workload",
                )
            },
            "boot_seconds": src.get("boot_seconds", 0.0),
            "shutdown_hangs": False,
            "cbt": True,
            "power": POWERED_OFF,
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
            vm["powered_on_at"] = time.time()
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

    def guest_ready(self, vm_id: str) -> bool:
        """Tools installed, powered on, and the guest's ``boot_seconds`` passed since its power-on."""
        vm = _settle(self._vm(vm_id))
        if not (vm["tools_installed"] and vm["power"] == POWERED_ON):
            return False
        return time.time() - vm.get("powered_on_at", 0.0) >= vm.get("boot_seconds", 0.0)

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
