"""Creating the production VM: a ConfigSpec like the replica's, placed on the chosen host or cluster,
datastore, resource pool and folder, with the creator's owner tag in ``extraConfig``.

Everything that can be checked is checked before CreateVM_Task, so that a refusal leaves nothing
behind: an unknown host, datastore, network, pool or folder (NotFound), a datastore the host does not
mount, a source network missing from the map or a VM name already in use (HypervisorError), a
datastore without room for all disks (InsufficientSpace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from ..base import HypervisorError, InsufficientSpace, NicSpec, NotFound, VMConfig
from .inventory import _VM_PROPS, _disk_capacity, _Obj

OWNER_KEY = "drportal.owner"  # extraConfig key holding the creating session's owner tag

_Op = vim.vm.device.VirtualDeviceSpec


def _owner_of(extra_config: Any) -> str | None:
    return next((str(opt.value) for opt in extra_config or () if opt.key == OWNER_KEY), None)


@dataclass(frozen=True)
class _Target:
    """Where the new VM goes, resolved and checked."""

    host: _Obj | None  # the host named, or None when a cluster was named (DRS picks the host)
    compute: _Obj  # the host or cluster: its networks are the ones the VM can reach
    datastore: _Obj
    pool: Any  # vim.ResourcePool
    folder: Any  # vim.Folder


@dataclass(frozen=True)
class _Networks:
    by_name: dict[str, _Obj]  # network name -> network the VM can use
    dvs_uuid: dict[str, str]  # distributed switch id -> its uuid
    parking: _Obj | None  # the standard network a NIC that stays disconnected is put on


def _nic_backing(net: _Obj, dvs_uuid: dict[str, str]) -> Any:
    if isinstance(net.ref, vim.dvs.DistributedVirtualPortgroup):
        switch = net.get("config.distributedVirtualSwitch")
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(
                portgroupKey=net.get("key") or net.id,
                switchUuid=dvs_uuid.get(switch._moId) if switch is not None else None,
            )
        )
    if isinstance(net.ref, vim.OpaqueNetwork):
        summary = net.get("summary")
        return vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo(
            opaqueNetworkId=summary.opaqueNetworkId, opaqueNetworkType=summary.opaqueNetworkType
        )
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=net.get("name"), network=net.ref)


class _NewDevices:
    """The ``deviceChange`` of a new VM like the source: each source controller is copied on first use
    (same type and bus number, so disk keys stay the same), every new device gets its own negative key."""

    def __init__(self, source_devices: list[Any]) -> None:
        self.changes: list[Any] = []
        self._source = {d.key: d for d in source_devices}
        self._controllers: dict[int, int] = {}  # source controller key -> key in the new VM
        self._next = -100

    def _key(self) -> int:
        key, self._next = self._next, self._next - 1
        return key

    def controller_for(self, src_key: int) -> int:
        if src_key not in self._controllers:
            ctrl = self._source[src_key]
            if isinstance(ctrl, vim.vm.device.VirtualIDEController):
                self._controllers[src_key] = 200 + ctrl.busNumber  # every VM has IDE 0 and 1 under these keys
            else:
                copy = type(ctrl)(key=self._key(), busNumber=ctrl.busNumber)
                if isinstance(ctrl, vim.vm.device.VirtualSCSIController):
                    copy.sharedBus = ctrl.sharedBus or "noSharing"
                self.changes.append(_Op(operation="add", device=copy))
                self._controllers[src_key] = copy.key
        return self._controllers[src_key]

    def add_disk(self, source: Any, datastore: str) -> None:
        """An empty disk of the source's size and provisioning (thin/thick, eager zeroing) on ``datastore``."""
        b = source.backing
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{datastore}]",
            diskMode="persistent",
            thinProvisioned=bool(getattr(b, "thinProvisioned", False)),
            eagerlyScrub=bool(getattr(b, "eagerlyScrub", False)),
        )
        capacity = _disk_capacity(source)
        controller = self.controller_for(source.controllerKey)
        disk = vim.vm.device.VirtualDisk(
            key=self._key(),
            controllerKey=controller,
            unitNumber=source.unitNumber,
            capacityInBytes=capacity,
            capacityInKB=capacity // 1024,
            backing=backing,
        )
        self.changes.append(_Op(operation="add", fileOperation="create", device=disk))

    def add_nic(self, source: Any, net: _Obj, dvs_uuid: dict[str, str], *, connect: bool) -> None:
        """A NIC of the source's type on ``net``; ``connect`` False: present, never connecting by itself."""
        new = type(source)(key=self._key(), addressType="generated", wakeOnLanEnabled=source.wakeOnLanEnabled)
        new.connectable = vim.vm.device.VirtualDevice.ConnectInfo(
            startConnected=connect, connected=False, allowGuestControl=connect
        )
        new.backing = _nic_backing(net, dvs_uuid)
        self.changes.append(_Op(operation="add", device=new))


class Provisioning:
    """The creation part of ``VSphereHypervisor``."""

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
        """CreateVM_Task for a powered-off VM like the source: same CPUs (and cores per socket),
        memory, guest OS and firmware; the same disk controllers with empty disks of equal size and
        provisioning (thin/thick, eager zeroing) on ``datastore``; NICs of the same type mapped
        through ``network_map`` (None: present but not connected); change tracking enabled.

        ``host`` is a host or a cluster name (a cluster lets DRS pick the host). ``resource_pool``
        and ``folder`` are ids from placement(); by default the host's (cluster's) root pool and the
        datacenter's VM folder. Refused before anything is created: see the module docstring.
        """
        what = f"Create {name!r} like {source_vm_id}"
        src = self._vm_props(source_vm_id, _VM_PROPS, f"Read the configuration of {source_vm_id}")
        world = self._world(["name"])
        source_cfg = self._config(src, self._names(world))
        target = self._target(world, what, host, datastore, resource_pool, folder)
        if any(v.get("name") == name for v in world[vim.VirtualMachine]):
            raise HypervisorError(f"{what}: The name '{name}' already exists.")
        nets = self._target_networks(world, target, network_map, what)
        needed = sum(d.capacity_bytes for d in source_cfg.disks)
        free = int(target.datastore.get("summary.freeSpace") or 0)
        if needed > free:
            raise InsufficientSpace(
                f"{what}: Insufficient disk space on datastore '{datastore}': {needed} bytes needed, {free} free."
            )
        spec = self._config_spec(src, name, datastore, owner_tag)
        spec.deviceChange = self._device_changes(src, source_cfg, datastore, network_map, nets, what, host)
        host_ref = target.host.ref if target.host is not None else None
        task = self._call(
            what, lambda: target.folder.CreateVM_Task(config=spec, pool=target.pool, host=host_ref), idempotent=False
        )
        return self._wait(task, what)._moId

    def _target(
        self,
        world: dict[type, list[_Obj]],
        what: str,
        host: str,
        datastore: str,
        resource_pool: str | None,
        folder: str | None,
    ) -> _Target:
        """The host or cluster, datastore, resource pool and VM folder, each checked to exist and fit."""
        by_id = {o.id: o for objs in world.values() for o in objs}
        target_host = next((h for h in world[vim.HostSystem] if h.get("name") == host), None)
        cluster = next(
            (
                c
                for c in world[vim.ComputeResource]
                if c.get("name") == host and isinstance(c.ref, vim.ClusterComputeResource)
            ),
            None,
        )
        if target_host is None and cluster is None:
            raise NotFound(f"{what}: no host or cluster named {host!r} in {self.where}.")
        ds = next((d for d in world[vim.Datastore] if d.get("name") == datastore), None)
        if ds is None:
            raise NotFound(f"{what}: no datastore named {datastore!r} in {self.where}.")
        reach = target_host if target_host is not None else cluster
        if ds.id not in {r._moId for r in reach.get("datastore") or ()}:
            raise HypervisorError(f"{what}: datastore {datastore!r} is not available on {host!r}.")
        compute = by_id.get(target_host.get("parent")._moId) if target_host is not None else cluster
        return _Target(
            host=target_host,
            compute=reach,
            datastore=ds,
            pool=self._pool(by_id, compute, resource_pool, what, host),
            folder=self._vm_folder(by_id, compute, folder, what, host),
        )

    def _pool(
        self, by_id: dict[str, _Obj], compute: _Obj | None, resource_pool: str | None, what: str, host: str
    ) -> Any:
        if resource_pool is not None:
            pool = by_id.get(resource_pool)
            if pool is None or not isinstance(pool.ref, vim.ResourcePool):
                raise NotFound(f"{what}: no resource pool {resource_pool!r} in {self.where}.")
            return pool.ref
        pool = compute.get("resourcePool") if compute is not None else None
        if pool is None:
            raise HypervisorError(f"{what}: {host!r} has no resource pool.")
        return pool

    def _vm_folder(self, by_id: dict[str, _Obj], compute: _Obj | None, folder: str | None, what: str, host: str) -> Any:
        if folder is not None:
            found = by_id.get(folder)
            if (
                found is None
                or not isinstance(found.ref, vim.Folder)
                or "VirtualMachine" not in (found.get("childType") or ())
            ):
                raise NotFound(f"{what}: no VM folder {folder!r} in {self.where}.")
            return found.ref
        dc = compute
        while dc is not None and not isinstance(dc.ref, vim.Datacenter):
            dc = by_id.get(getattr(dc.get("parent"), "_moId", ""))
        if dc is None:
            raise HypervisorError(f"{what}: cannot find the datacenter of {host!r}.")
        return dc.get("vmFolder")

    def _target_networks(
        self, world: dict[type, list[_Obj]], target: _Target, network_map: dict[str, str | None], what: str
    ) -> _Networks:
        nets = {n.get("name"): n for n in self._networks(world)}
        for name in network_map.values():
            if name is not None and name not in nets:
                raise NotFound(f"{what}: no network named {name!r} in {self.where}.")
        # vSphere wants a backing even for a NIC that is not connected: such a NIC gets the first
        # standard network of the target (it never connects by itself: startConnected is false).
        reachable = {r._moId for r in target.compute.get("network") or ()}
        parking = next(
            (
                n
                for n in sorted(world[vim.Network], key=lambda n: n.get("name"))
                if type(n.ref) is vim.Network and n.id in reachable
            ),
            None,
        )
        return _Networks(nets, {d.id: d.get("uuid") for d in world[vim.DistributedVirtualSwitch]}, parking)

    @staticmethod
    def _config_spec(src: _Obj, name: str, datastore: str, owner_tag: str | None) -> Any:
        spec = vim.vm.ConfigSpec(
            name=name,
            guestId=src.get("config.guestId"),
            numCPUs=src.get("config.hardware.numCPU"),
            numCoresPerSocket=src.get("config.hardware.numCoresPerSocket"),
            memoryMB=src.get("config.hardware.memoryMB"),
            firmware=src.get("config.firmware") or "bios",
            changeTrackingEnabled=True,
            files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"),
            deviceChange=[],
        )
        if owner_tag:  # proof of creation, readable even when the answer to CreateVM_Task is lost
            spec.extraConfig = [vim.option.OptionValue(key=OWNER_KEY, value=owner_tag)]
            spec.annotation = f"Created by the failback portal ({OWNER_KEY}={owner_tag})"
        return spec

    @staticmethod
    def _device_changes(
        src: _Obj,
        source_cfg: VMConfig,
        datastore: str,
        network_map: dict[str, str | None],
        nets: _Networks,
        what: str,
        host: str,
    ) -> list[Any]:
        devices = list(src.get("config.hardware.device") or ())
        new = _NewDevices(devices)
        for d in devices:
            if isinstance(d, vim.vm.device.VirtualDisk):
                new.add_disk(d, datastore)
        cards = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), key=lambda d: d.key)
        for card, nic in zip(cards, source_cfg.nics, strict=True):
            target = _mapped(nic, network_map, what, src.get("name"))
            if target is None and nets.parking is None:
                raise HypervisorError(
                    f"{what}: {host!r} has no standard network to park the disconnected {nic.key} on."
                )
            net = nets.by_name[target] if target is not None else nets.parking
            new.add_nic(card, net, nets.dvs_uuid, connect=target is not None)
        return new.changes


def _mapped(nic: NicSpec, network_map: dict[str, str | None], what: str, vm_name: str) -> str | None:
    """The target network of a source NIC; a source network missing from the map is refused."""
    if nic.network is None:
        return None
    if nic.network not in network_map:
        raise HypervisorError(f"{what}: no mapping given for network {nic.network!r} ({nic.key}) of {vm_name}.")
    return network_map[nic.network]
