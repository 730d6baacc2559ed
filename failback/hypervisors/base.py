"""The hypervisor interface: every operation failback needs from a virtualisation platform.

Two implementations: ``lab`` (the embedded default, real sparse disk files under ``var/lab/``)
and ``vsphere`` (pyvmomi). Nothing here imports Django; the workflow layer talks to a platform
only through this Protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Power states, named as vSphere names them.
POWERED_ON = "poweredOn"
POWERED_OFF = "poweredOff"
SUSPENDED = "suspended"


class HypervisorError(Exception):
    """A platform refused or failed an operation; the message is the platform's own."""


class NotFound(HypervisorError):
    """The named VM, host, datastore or network does not exist."""


class InsufficientSpace(HypervisorError):
    """The target datastore cannot hold the disks."""


@dataclass(frozen=True)
class DiskSpec:
    key: str  # stable per VM, e.g. "scsi0:0"
    capacity_bytes: int
    datastore: str
    thin: bool = True


@dataclass(frozen=True)
class NicSpec:
    key: str  # e.g. "nic0"
    network: str | None  # None = disconnected


@dataclass(frozen=True)
class VMConfig:
    vm_id: str
    name: str
    host: str
    cpus: int
    memory_mb: int
    guest_os: str
    firmware: str  # "bios" | "efi"
    disks: tuple[DiskSpec, ...]
    nics: tuple[NicSpec, ...]
    tools_installed: bool
    datastore: str  # where the configuration files live


@dataclass(frozen=True)
class Inventory:
    hosts: tuple[str, ...]
    datastores: dict[str, int] = field(default_factory=dict)  # name -> free bytes
    networks: tuple[str, ...] = ()
    vms: tuple[VMConfig, ...] = ()


@dataclass(frozen=True)
class ChangedAreas:
    """Extents changed on a disk since a change id, like vSphere's QueryChangedDiskAreas."""

    change_id: str  # the id to pass next time
    extents: tuple[tuple[int, int], ...]  # (offset, length), sorted, non-overlapping


@runtime_checkable
class Hypervisor(Protocol):
    """What failback needs from a platform. All ids and names are strings."""

    name: str  # "lab" | "vsphere"

    # -- inventory -----------------------------------------------------------
    def inventory(self) -> Inventory: ...

    def vm_config(self, vm_id: str) -> VMConfig: ...

    def host_states(self) -> dict[str, str]:
        """Host name -> connected | maintenance | disconnected | notResponding."""
        ...

    # -- lifecycle -----------------------------------------------------------
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
        """Create and register an empty VM with the source's configuration; return its id.

        ``resource_pool`` and ``folder`` are platform ids (vSphere); None means the host's defaults.
        ``owner_tag`` is stored on the VM at creation (vSphere: ``extraConfig``), so that its creator
        can prove the VM is its own even when the answer to the create was lost (``find_owned_vm``).

        Disks have the same sizes and hold no data (sparse). Raises InsufficientSpace when
        the datastore cannot hold the disks, NotFound for an unknown host/datastore/network.
        """
        ...

    def delete_vm(self, vm_id: str) -> None: ...

    def vm_owner(self, vm_id: str) -> str | None:
        """The ``owner_tag`` the VM was created with, or None. NotFound when there is no such VM."""
        ...

    def find_owned_vm(self, owner_tag: str) -> str | None:
        """The id of the VM created with this ``owner_tag``, or None: never a look-up by name."""
        ...

    def power_state(self, vm_id: str) -> str: ...

    def power_states(self) -> dict[str, str]:
        """Every VM's power state at once (vm id -> state), for lists."""
        ...

    def power_on(self, vm_id: str) -> None: ...

    def power_off(self, vm_id: str) -> None:
        """Hard power off, at once."""
        ...

    def tools_running(self, vm_id: str) -> bool: ...

    def shutdown_guest(self, vm_id: str) -> None:
        """Ask the guest OS to shut down; returns at once. Poll power_state to see it end."""
        ...

    # -- disk access for the transfer engine --------------------------------
    def disk_path(self, vm_id: str, disk_key: str) -> str:
        """A local path to the disk's raw data (lab files; vSphere direct mode)."""
        ...

    def change_tracking(self, vm_id: str, disk_key: str) -> str | None:
        """Current change id of the disk, or None when the VM offers no change tracking."""
        ...

    def changed_areas(self, vm_id: str, disk_key: str, since_change_id: str) -> ChangedAreas:
        """Extents written since ``since_change_id`` (from change_tracking())."""
        ...

    def close(self) -> None:
        """Release the platform session (idempotent)."""
        ...
