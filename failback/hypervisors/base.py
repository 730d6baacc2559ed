"""The hypervisor interface: every operation failback needs from a virtualisation platform.

Two implementations: ``lab`` (the embedded default, real sparse disk files under ``var/lab/``)
and ``vsphere`` (pyvmomi). Nothing here imports Django; the workflow layer talks to a platform
only through these Protocols, with no ``hasattr`` probes: every platform implements every method,
answering "nothing" (``{}``, an empty ``Placement``, None) where it has nothing to say.

``Hypervisor`` is the whole contract; ``DiskAccess`` is its disk part (what the transfer engine and
the verification read and write), split out so that it can be read on its own. ``docs/platforms.md``
says how to add a platform; ``tests/test_platform_contract.py`` holds every platform to the contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

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


@dataclass(frozen=True)
class Placement:
    """Where a production VM can go, for the wizard. Paths are inventory paths below the root.

    A platform without datacenters, clusters, pools or folders (the lab) returns ``Placement()``:
    every part empty, so the wizard offers hosts and datastores only."""

    datacenters: tuple[str, ...] = ()  # e.g. ("DC0",)
    clusters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # cluster name -> its hosts
    hosts: dict[str, str | None] = field(default_factory=dict)  # host name -> its cluster (None: standalone)
    resource_pools: dict[str, str] = field(
        default_factory=dict
    )  # id -> path, e.g. "resgroup-26" -> "DC0/DC0_C0/Resources"
    folders: dict[str, str] = field(default_factory=dict)  # VM folder id -> path, e.g. "group-v3" -> "DC0/vm"


Transport = Literal["direct", "network", "nbd"]


@dataclass(frozen=True)
class NbdExport:
    """How nbdkit serves one disk for the nbd transport: the plugin and its ``key=value`` arguments.
    The portal starts the server (failback/jobs/nbd.py), so the adapter only says what to serve.

    ``password`` (the vddk plugin's vCenter password) is kept out of ``args``: the portal writes it
    to a private file and passes ``password=+FILE``, so it never shows in a process list.
    ``verified`` says whether this plugin has been run by the project's tests (``file``: yes, against
    Debian's nbdkit; ``vddk``: no, only its command line; see README, "The NBD transport")."""

    plugin: str  # "file" | "vddk"
    args: tuple[str, ...]
    readonly: bool
    password: str | None = field(default=None, repr=False)
    verified: bool = True


@runtime_checkable
class DiskAccess(Protocol):
    """How the transfer engine reaches a VM's disk data. A disk is named by its ``disk_key``
    (``"scsi0:0"``), which is the same on a VM and on the one ``create_vm_like`` made from it.

    ``transport`` says which methods carry the data:

    - ``"direct"``: ``disk_path`` gives a local file the engine reads and writes by range (the lab
      always; vSphere with the datastores mounted on the worker host).
    - ``"network"``: no local file; ranges are read with ``download_range`` and a whole disk is
      copied from VM to VM with ``copy_disk_network`` (the target cannot be written by range).
    - ``"nbd"``: ``nbd_export`` says how nbdkit serves the disk; the engine reads and writes it by
      range over NBD (libnbd), as in direct mode.

    ``download_range`` and ``copy_disk_network`` work in both modes, so checks and tests can use them
    on any platform.
    """

    transport: Transport

    def disk_path(self, vm_id: str, disk_key: str) -> str:
        """A local path to the disk's raw data (lab files; vSphere direct mode). HypervisorError
        when the transport is not direct."""
        ...

    def nbd_export(self, vm_id: str, disk_key: str, *, writable: bool, snapshot: str | None = None) -> NbdExport:
        """How nbdkit serves the disk (read-only unless ``writable``; ``snapshot``: a snapshot id to
        read from, where the platform has them): the ``file`` plugin on a disk file this host can
        reach, or the platform's own plugin (vSphere: ``vddk``). HypervisorError when neither is
        possible here."""
        ...

    def download_range(self, vm_id: str, disk_key: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of the disk from ``offset`` (unwritten areas read as zeros).
        HypervisorError for a range outside the disk, NotFound for an unknown VM or disk."""
        ...

    def copy_disk_network(
        self, src_vm_id: str, dst_vm_id: str, disk_key: str, *, progress: Callable[[int], None] | None = None
    ) -> int:
        """Replace the whole content of ``dst_vm_id``'s disk with ``src_vm_id``'s disk of the same key
        and size; return the bytes sent. HypervisorError when the sizes differ. ``progress(sent)``, when
        given, is called in the calling thread as the copy goes (bytes sent so far); an exception it raises
        stops the copy and propagates."""
        ...

    def change_tracking(self, vm_id: str, disk_key: str) -> str | None:
        """Current change id of the disk, or None when the VM offers no change tracking (the caller
        then compares block digests instead)."""
        ...

    def changed_areas(self, vm_id: str, disk_key: str, since_change_id: str) -> ChangedAreas:
        """Extents written since ``since_change_id`` (from change_tracking()); ``"*"`` means every
        allocated area. HypervisorError when the platform cannot tell."""
        ...


@runtime_checkable
class Hypervisor(DiskAccess, Protocol):
    """What failback needs from a platform. All ids and names are strings."""

    name: str  # "lab" | "vsphere": the Replica.platform value this adapter serves

    @property
    def where(self) -> str:
        """Where the platform is, for messages: "vCenter host:443", "Lab hypervisor at /srv/lab"."""
        ...

    def about(self) -> str:
        """A one-line description of the platform and its version, after a real round trip to it:
        the "Test connection" button. HypervisorError when the platform cannot be reached."""
        ...

    # -- inventory -----------------------------------------------------------
    def inventory(self) -> Inventory: ...

    def vm_config(self, vm_id: str) -> VMConfig: ...

    def host_states(self) -> dict[str, str]:
        """Host name -> connected | maintenance | disconnected | notResponding."""
        ...

    def placement(self) -> Placement:
        """Datacenters, clusters, resource pools and VM folders for the wizard; ``Placement()`` when
        the platform has none of them."""
        ...

    def custom_attribute_values(self, attribute: str) -> dict[str, str]:
        """VM id -> value of the custom attribute named ``attribute`` (replica discovery), VMs without a
        value left out; ``{}`` on a platform without custom attributes or without that attribute."""
        ...

    def vm_meta(self, vm_id: str) -> dict[str, Any]:
        """Guest hints the platform knows beyond ``VMConfig``; possibly empty, so read it with ``.get``.
        Known keys: ``shutdown_seconds`` (float, how long the guest takes to shut down) and
        ``shutdown_hangs`` (bool, it never finishes); the lab adds its own state (power, knobs).
        NotFound when there is no such VM."""
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

    def guest_ready(self, vm_id: str) -> bool:
        """Whether the guest is up for a plan's next boot group: powered on and its guest says so
        (vSphere: VMware Tools running with a green heartbeat; the lab: tools installed and its
        ``boot_seconds`` since power-on passed). False, not an error, while it is not."""
        ...

    def shutdown_guest(self, vm_id: str) -> None:
        """Ask the guest OS to shut down; returns at once. Poll power_state to see it end."""
        ...

    # -- disk access for the transfer engine: see DiskAccess ----------------

    def close(self) -> None:
        """Release the platform session (idempotent)."""
        ...
