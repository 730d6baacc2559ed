"""Reading vCenter's inventory: the property collector (one RetrievePropertiesEx per question), the
configuration of a VM as a ``VMConfig``, the hosts' states and the wizard's ``Placement``.

Identifiers: a VM is its managed object id (``vm-42``); hosts, clusters, datastores and networks
are their names, as the wizard shows them. A disk is ``<controller><bus>:<unit>`` (``scsi0:0``),
which stays the same on the production VM because ``create_vm_like`` keeps bus and unit numbers.
A NIC is ``nic<N>`` in the order of its device key.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from ..base import DiskSpec, HypervisorError, Inventory, NicSpec, NotFound, Placement, VMConfig

_DS_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")


@dataclass
class _Obj:
    ref: Any  # the pyvmomi managed object
    props: dict[str, Any]

    @property
    def id(self) -> str:
        return self.ref._moId

    def get(self, name: str, default: Any = None) -> Any:
        return self.props.get(name, default)


# Properties read per type: one RetrievePropertiesEx brings all of them for all objects.
_VM_PROPS = [
    "name",
    "config.template",
    "config.hardware.numCPU",
    "config.hardware.numCoresPerSocket",
    "config.hardware.memoryMB",
    "config.guestId",
    "config.firmware",
    "config.hardware.device",
    "config.files.vmPathName",
    "config.changeTrackingEnabled",
    "runtime.host",
    "runtime.powerState",
    "guest.toolsStatus",
    "guest.toolsRunningStatus",
    "network",
    "datastore",
    "parent",
]
_HOST_PROPS = ["name", "parent", "datastore", "network"]
_DS_PROPS = ["name", "summary.freeSpace", "summary.accessible", "summary.url", "parent"]
_NET_PROPS = ["name"]
_DVPG_PROPS = ["name", "key", "config.distributedVirtualSwitch", "tag"]
_OPAQUE_PROPS = ["name", "summary"]
_DVS_PROPS = ["uuid", "config.uplinkPortgroup"]
_PLACE_PROPS = {
    vim.Datacenter: ["name", "parent", "vmFolder"],
    vim.Folder: ["name", "parent", "childType"],
    vim.ComputeResource: ["name", "parent", "resourcePool", "host", "datastore", "network"],
    vim.ResourcePool: ["name", "parent", "owner"],
}


def _controller_prefix(ctrl: Any) -> str:
    if isinstance(ctrl, vim.vm.device.VirtualSCSIController):
        return "scsi"
    if isinstance(ctrl, vim.vm.device.VirtualIDEController):
        return "ide"
    if isinstance(ctrl, vim.vm.device.VirtualAHCIController | vim.vm.device.VirtualSATAController):
        return "sata"
    if isinstance(ctrl, vim.vm.device.VirtualNVMEController):
        return "nvme"
    return type(ctrl).__name__.rsplit(".", 1)[-1].lower()


def _disk_key(ctrl: Any, disk: Any) -> str:
    """``scsi0:0``: controller type and bus, and the disk's unit number."""
    return f"{_controller_prefix(ctrl)}{getattr(ctrl, 'busNumber', 0)}:{disk.unitNumber}"


def _disk_capacity(disk: Any) -> int:
    return int(disk.capacityInBytes or 0) or int(disk.capacityInKB or 0) * 1024


def _split_ds_path(path: str) -> tuple[str, str]:
    m = _DS_PATH.match(path or "")
    if not m:
        raise HypervisorError(f"Unexpected datastore path {path!r}.")
    return m.group("ds"), m.group("path").strip()


class InventoryReader:
    """The inventory part of ``VSphereHypervisor`` (it keeps ``_datastore_paths`` and ``_dc_of_ds``)."""

    _datastore_paths: dict[str, str]
    _dc_of_ds: dict[str, str]

    # -- property collection -------------------------------------------------------------------------

    def _retrieve(self, spec: Any) -> list[_Obj]:
        """RetrievePropertiesEx with paging; missing properties an object cannot show are left out,
        but an unauthenticated session raises (vCenter reports it per property, not as a fault)."""
        pc = self._content.propertyCollector
        result = pc.RetrievePropertiesEx(specSet=[spec], options=vmodl.query.PropertyCollector.RetrieveOptions())
        out: list[_Obj] = []
        while result is not None:
            for oc in result.objects or ():
                for missing in oc.missingSet or ():
                    if isinstance(missing.fault, vim.fault.NotAuthenticated):
                        raise missing.fault
                out.append(_Obj(oc.obj, {p.name: p.val for p in oc.propSet or ()}))
            if not result.token:
                break
            result = pc.ContinueRetrievePropertiesEx(token=result.token)
        return out

    def _collect_all(self, props: dict[type, list[str]]) -> dict[type, list[_Obj]]:
        """Every object of the given types below the root folder, in one RetrievePropertiesEx."""
        FS = vmodl.query.PropertyCollector
        view = self._content.viewManager.CreateContainerView(self._content.rootFolder, list(props), True)
        try:
            spec = FS.FilterSpec(
                objectSet=[
                    FS.ObjectSpec(
                        obj=view,
                        skip=True,
                        selectSet=[FS.TraversalSpec(name="view", type=vim.view.ContainerView, path="view", skip=False)],
                    )
                ],
                propSet=[FS.PropertySpec(type=t, pathSet=paths) for t, paths in props.items()],
            )
            objs = self._retrieve(spec)
        finally:
            with contextlib.suppress(Exception):
                view.DestroyView()
        out: dict[type, list[_Obj]] = {t: [] for t in props}
        for o in objs:  # most specific type first (DistributedVirtualPortgroup before Network)
            for t in sorted(props, key=lambda t: -len(t.__mro__)):
                if isinstance(o.ref, t):
                    out[t].append(o)
                    break
        return out

    def _collect(self, refs: list[Any], props: dict[type, list[str]]) -> list[_Obj]:
        FS = vmodl.query.PropertyCollector
        spec = FS.FilterSpec(
            objectSet=[FS.ObjectSpec(obj=r, skip=False) for r in refs],
            propSet=[FS.PropertySpec(type=t, pathSet=p) for t, p in props.items()],
        )
        return self._retrieve(spec)

    def _vm_ref(self, vm_id: str) -> Any:
        if not isinstance(vm_id, str) or not vm_id:
            raise NotFound(f"No virtual machine {vm_id!r} in {self.where}.")
        return vim.VirtualMachine(vm_id, self._stub)

    def _vm_props(self, vm_id: str, paths: list[str], what: str) -> _Obj:
        self._vm_ref(vm_id)  # refuses an empty or non-string id
        try:
            objs = self._call(what, lambda: self._collect([self._vm_ref(vm_id)], {vim.VirtualMachine: paths}))
        except NotFound:
            raise NotFound(f"No virtual machine {vm_id!r} in {self.where}.") from None
        if not objs:
            raise NotFound(f"No virtual machine {vm_id!r} in {self.where}.")
        return objs[0]

    # -- inventory ---------------------------------------------------------------------------------

    def _world(self, vm_props: list[str]) -> dict[type, list[_Obj]]:
        return self._call(
            f"Read the inventory of {self.where}",
            lambda: self._collect_all(
                {
                    vim.HostSystem: _HOST_PROPS,
                    vim.Datastore: _DS_PROPS,
                    vim.Network: _NET_PROPS,
                    vim.dvs.DistributedVirtualPortgroup: _DVPG_PROPS,
                    vim.OpaqueNetwork: _OPAQUE_PROPS,
                    vim.DistributedVirtualSwitch: _DVS_PROPS,
                    vim.VirtualMachine: vm_props,
                    **_PLACE_PROPS,
                }
            ),
        )

    @staticmethod
    def _names(world: dict[type, list[_Obj]]) -> dict[str, str]:
        """moref id -> name for hosts, datastores and networks; DVPG keys map to their names too."""
        names: dict[str, str] = {}
        for t in (vim.HostSystem, vim.Datastore, vim.Network, vim.dvs.DistributedVirtualPortgroup, vim.OpaqueNetwork):
            for o in world.get(t, ()):
                names[o.id] = o.get("name", o.id)
                if t is vim.dvs.DistributedVirtualPortgroup and o.get("key"):
                    names["dvpg:" + o.get("key")] = o.get("name", o.id)
                if t is vim.OpaqueNetwork and o.get("summary") is not None:
                    names["opaque:" + str(o.get("summary").opaqueNetworkId)] = o.get("name", o.id)
        return names

    @staticmethod
    def _networks(world: dict[type, list[_Obj]]) -> list[_Obj]:
        """Networks a VM can use: standard, distributed (not uplink port groups) and opaque."""
        uplinks = {
            u._moId
            for d in world.get(vim.DistributedVirtualSwitch, ())
            for u in (d.get("config.uplinkPortgroup") or ())
        }
        out = list(world.get(vim.Network, ())) + list(world.get(vim.OpaqueNetwork, ()))
        for pg in world.get(vim.dvs.DistributedVirtualPortgroup, ()):
            tags = {t.key for t in pg.get("tag") or ()}
            if pg.id in uplinks or "SYSTEM/DVS.UPLINKPG" in tags:
                continue
            out.append(pg)
        return out

    def inventory(self) -> Inventory:
        """Hosts, datastores with free bytes, networks and VMs (with their configuration), read in a
        single RetrievePropertiesEx over a container view (plus its paging continuations)."""
        world = self._world(_VM_PROPS)
        names = self._names(world)
        networks: list[str] = []
        for n in self._networks(world):
            if n.get("name") not in networks:
                networks.append(n.get("name"))
        vms = []
        for o in sorted(world[vim.VirtualMachine], key=lambda o: (o.get("name") or "", o.id)):
            if o.get("config.template") or o.get("config.hardware.device") is None:
                continue  # templates, and VMs vCenter cannot read (inaccessible, orphaned)
            vms.append(self._config(o, names))
        self._learn_datastores(world)
        return Inventory(
            hosts=tuple(sorted(h.get("name") for h in world[vim.HostSystem])),
            datastores={
                d.get("name"): int(d.get("summary.freeSpace") or 0)
                for d in sorted(world[vim.Datastore], key=lambda d: d.get("name"))
                if d.get("summary.accessible", True)
            },
            networks=tuple(networks),
            vms=tuple(vms),
        )

    def power_states(self) -> dict[str, str]:
        """Every VM's power state (vm id -> poweredOn/poweredOff/suspended), in one round trip."""
        world = self._call(
            f"Read the power states in {self.where}",
            lambda: self._collect_all({vim.VirtualMachine: ["runtime.powerState"]}),
        )
        return {o.id: str(o.get("runtime.powerState")) for o in world[vim.VirtualMachine]}

    def host_states(self) -> dict[str, str]:
        """Host name -> connected | maintenance | disconnected | notResponding, in one round trip."""
        world = self._call(
            f"Read the host states in {self.where}",
            lambda: self._collect_all(
                {vim.HostSystem: ["name", "runtime.connectionState", "runtime.inMaintenanceMode"]}
            ),
        )
        return {
            h.get("name"): "maintenance"
            if h.get("runtime.inMaintenanceMode")
            else str(h.get("runtime.connectionState") or "connected")
            for h in world[vim.HostSystem]
        }

    def custom_attribute_values(self, attribute: str) -> dict[str, str]:
        """vm id -> value of the custom attribute named ``attribute`` (for replica discovery: the value
        names the source workload); VMs without a value are left out. One round trip for all VMs."""

        def read() -> dict[str, str]:
            fields = self._content.customFieldsManager.field if self._content.customFieldsManager else []
            key = next((f.key for f in fields or () if f.name == attribute), None)
            if key is None:
                return {}
            world = self._collect_all({vim.VirtualMachine: ["customValue"]})
            return {
                o.id: v.value
                for o in world[vim.VirtualMachine]
                for v in (o.get("customValue") or ())
                if v.key == key and getattr(v, "value", "")
            }

        return self._call(f"Read custom attribute {attribute!r} in {self.where}", read)

    def placement(self) -> Placement:
        """Datacenters, clusters with their hosts, resource pools and VM folders, in one round trip."""
        world = self._call(
            f"Read the inventory of {self.where}",
            lambda: self._collect_all({vim.HostSystem: ["name", "parent"], **_PLACE_PROPS}),
        )
        by_id = {o.id: o for objs in world.values() for o in objs}
        path = self._path_fn(by_id)
        clusters: dict[str, tuple[str, ...]] = {}
        hosts: dict[str, str | None] = {}
        host_name = {h.id: h.get("name") for h in world[vim.HostSystem]}
        for cr in world[vim.ComputeResource]:
            members = tuple(sorted(host_name.get(h._moId, h._moId) for h in cr.get("host") or ()))
            is_cluster = isinstance(cr.ref, vim.ClusterComputeResource)
            if is_cluster:
                clusters[cr.get("name")] = members
            for h in members:
                hosts[h] = cr.get("name") if is_cluster else None
        folders = {f.id: path(f.id) for f in world[vim.Folder] if "VirtualMachine" in (f.get("childType") or ())}
        return Placement(
            datacenters=tuple(sorted(path(d.id) for d in world[vim.Datacenter])),
            clusters=dict(sorted(clusters.items())),
            hosts=dict(sorted(hosts.items())),
            resource_pools=dict(sorted(((p.id, path(p.id)) for p in world[vim.ResourcePool]), key=lambda kv: kv[1])),
            folders=dict(sorted(folders.items(), key=lambda kv: kv[1])),
        )

    @staticmethod
    def _path_fn(by_id: dict[str, _Obj]) -> Callable[[str], str]:
        """Inventory path of an object below the root folder, as govc writes it ("DC0/host/C0/Resources")."""

        def path(obj_id: str) -> str:
            parts: list[str] = []
            while obj_id in by_id and len(parts) < 64:
                o = by_id[obj_id]
                parts.append(o.get("name") or obj_id)
                obj_id = getattr(o.get("parent"), "_moId", "")
            return "/".join(reversed(parts))

        return path

    def vm_config(self, vm_id: str) -> VMConfig:
        o = self._vm_props(vm_id, _VM_PROPS, f"Read the configuration of {vm_id}")
        if o.get("config.hardware.device") is None:
            raise HypervisorError(
                f"Read the configuration of {vm_id}: vCenter cannot read this VM's configuration (inaccessible)."
            )
        refs = [o.get("runtime.host")] if o.get("runtime.host") is not None else []
        refs += list(o.get("network") or ()) + list(o.get("datastore") or ())
        related = (
            self._call(
                f"Read the configuration of {vm_id}",
                lambda: self._collect(
                    refs,
                    {
                        vim.HostSystem: ["name"],
                        vim.Datastore: ["name"],
                        vim.Network: _NET_PROPS,
                        vim.dvs.DistributedVirtualPortgroup: _DVPG_PROPS,
                        vim.OpaqueNetwork: _OPAQUE_PROPS,
                    },
                ),
            )
            if refs
            else []
        )
        world: dict[type, list[_Obj]] = {}
        for r in related:
            for t in (
                vim.HostSystem,
                vim.Datastore,
                vim.dvs.DistributedVirtualPortgroup,
                vim.OpaqueNetwork,
                vim.Network,
            ):
                if isinstance(r.ref, t):
                    world.setdefault(t, []).append(r)
                    break
        return self._config(o, self._names(world))

    def _config(self, o: _Obj, names: dict[str, str]) -> VMConfig:
        devices = list(o.get("config.hardware.device") or ())
        by_key = {d.key: d for d in devices}
        disks, nics = [], []
        for d in devices:
            if isinstance(d, vim.vm.device.VirtualDisk):
                ctrl = by_key.get(d.controllerKey)
                key = f"{_controller_prefix(ctrl)}{getattr(ctrl, 'busNumber', 0)}:{d.unitNumber}"
                backing = d.backing
                ds = names.get(getattr(getattr(backing, "datastore", None), "_moId", ""), "")
                if not ds and getattr(backing, "fileName", None):
                    ds = _split_ds_path(backing.fileName)[0]
                disks.append(DiskSpec(key, _disk_capacity(d), ds, bool(getattr(backing, "thinProvisioned", False))))
        cards = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), key=lambda d: d.key)
        for i, card in enumerate(cards):
            nics.append(NicSpec(f"nic{i}", self._nic_network(card, names)))
        host = o.get("runtime.host")
        vmx = o.get("config.files.vmPathName") or ""
        tools = o.get("guest.toolsStatus")
        return VMConfig(
            vm_id=o.id,
            name=o.get("name"),
            host=names.get(host._moId, host._moId) if host is not None else "",
            cpus=int(o.get("config.hardware.numCPU") or 0),
            memory_mb=int(o.get("config.hardware.memoryMB") or 0),
            guest_os=o.get("config.guestId") or "",
            firmware=o.get("config.firmware") or "bios",
            disks=tuple(sorted(disks, key=lambda s: s.key)),
            nics=tuple(nics),
            tools_installed=bool(tools) and tools != "toolsNotInstalled",
            datastore=_split_ds_path(vmx)[0] if vmx else "",
        )

    @staticmethod
    def _nic_network(card: Any, names: dict[str, str]) -> str | None:
        conn = card.connectable
        if conn is not None and not conn.startConnected:
            return None
        b = card.backing
        if isinstance(b, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo):
            return names.get(getattr(b.network, "_moId", ""), b.deviceName or None)
        if isinstance(b, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            key = b.port.portgroupKey if b.port else None
            return names.get("dvpg:" + str(key), names.get(str(key), key))
        if isinstance(b, vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
            return names.get("opaque:" + str(b.opaqueNetworkId), b.opaqueNetworkId)
        return None

    def _learn_datastores(self, world: dict[type, list[_Obj]]) -> None:
        """Default local paths (a datastore whose URL is a local directory: vcsim) and datacenters."""
        by_id = {o.id: o for objs in world.values() for o in objs}
        path = self._path_fn(by_id) if vim.Datacenter in world else None
        for d in world.get(vim.Datastore, ()):
            name, url = d.get("name"), d.get("summary.url") or ""
            if name not in self._datastore_paths and url.startswith("/") and os.path.isdir(url):
                self._datastore_paths[name] = url
            if path is not None:
                parent = d.get("parent")
                while parent is not None and parent._moId in by_id and not isinstance(parent, vim.Datacenter):
                    parent = by_id[parent._moId].get("parent")
                if parent is not None and isinstance(parent, vim.Datacenter):
                    self._dc_of_ds[name] = path(parent._moId)

    def _disk(self, vm_id: str, disk_key: str, what: str) -> tuple[_Obj, Any]:
        o = self._vm_props(
            vm_id,
            [
                "name",
                "config.hardware.device",
                "config.changeTrackingEnabled",
                "capability.changeTrackingSupported",
                "datastore",
            ],
            what,
        )
        devices = list(o.get("config.hardware.device") or ())
        by_key = {d.key: d for d in devices}
        for d in devices:
            if isinstance(d, vim.vm.device.VirtualDisk):
                ctrl = by_key.get(d.controllerKey)
                if f"{_controller_prefix(ctrl)}{getattr(ctrl, 'busNumber', 0)}:{d.unitNumber}" == disk_key:
                    return o, d
        raise NotFound(f"{o.get('name')} ({vm_id}) has no disk {disk_key!r}.")
