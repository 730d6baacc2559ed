"""The vSphere hypervisor: vCenter through pyvmomi, behind the same Protocol as the lab.

Identifiers: a VM is its managed object id (``vm-42``); hosts, clusters, datastores and networks
are their names, as the wizard shows them. A disk is ``<controller><bus>:<unit>`` (``scsi0:0``),
which stays the same on the production VM because ``create_vm_like`` keeps bus and unit numbers.
A NIC is ``nic<N>`` in the order of its device key.

TLS — never skipped silently:

- ``thumbprint`` given: the server's certificate must have exactly this SHA-256 thumbprint (checked
  on every connection, SOAP and file transfers alike); CA and host name are then not consulted.
  ``fetch_thumbprint()`` shows the thumbprint on first contact, for the admin to compare and pin.
- no thumbprint, ``verify=True``: the certificate must chain to the system CA store and match the
  host name.
- no thumbprint, ``verify=False``: refused at construction.

Calls: every SOAP call and file transfer has a socket timeout (``timeout``). Reads are retried up
to ``retries`` times on transient errors (connection reset or refused, timeout, HTTP 5xx from the
proxy); calls that change something are retried only when the connection was refused (the request
never left). An expired session (``NotAuthenticated``) logs in again once. Errors surface as
``HypervisorError`` (``NotFound``, ``InsufficientSpace``) carrying vSphere's own fault message.

Disk access for the transfer engine (``transport``):

- ``"direct"``: ``disk_path()`` returns the disk's flat extent (``<disk>-flat.vmdk``) on a locally
  mounted datastore (NFS, or vcsim's directories): ``datastore_paths[name]`` gives the mount point;
  by default a datastore whose ``summary.url`` is a local directory is used as is (vcsim).
- ``"network"``: the datastore HTTP file interface (``/folder/<path>?dcPath=…&dsName=…``) with the
  API session's cookie: ``download_range()`` (ranged GET), ``upload_disk()`` and
  ``copy_disk_network()`` (a streaming PUT of the whole file). The interface cannot write a range,
  so in network mode phase 2 re-sends the whole disk, not only the changes: say so to the admin.

Change tracking: ``change_tracking()`` returns the disk's ``changeId`` only when the VM has
``changeTrackingEnabled`` and the platform answers QueryChangedDiskAreas; otherwise None, and the
caller falls back to digest comparison. vcsim (govmomi 0.24) does not implement that method.

No Django here.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from pyVmomi import SoapStubAdapter, VmomiSupport, vim, vmodl

from .base import (
    POWERED_OFF,
    ChangedAreas,
    DiskSpec,
    HypervisorError,
    InsufficientSpace,
    Inventory,
    NicSpec,
    NotFound,
    VMConfig,
)

T = TypeVar("T")

MiB = 1 << 20
CHUNK = 4 * MiB  # file transfer buffer
DEFAULT_VERSION = "vim.version.version9"  # vSphere 6.0: used when the server lists no versions
_DS_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")

# Errors after which a call may be tried again: the network or the server's proxy hiccuped.
_TRANSIENT = (ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLEOFError)

# vSphere's own English texts for faults whose message a server may leave empty (vcsim does).
_FAULT_TEXT = {
    "InvalidPowerState": "The attempted operation cannot be performed in the current state ({state}).",
    "InvalidLogin": "Cannot complete login due to an incorrect user name or password.",
    "NotAuthenticated": "The session is not authenticated.",
    "DuplicateName": "The name '{name}' already exists.",
    "FileAlreadyExists": "Cannot complete the operation because the file or folder {file} already exists",
    "FileNotFound": "File {file} was not found",
    "ManagedObjectNotFound": "The object '{obj}' has already been deleted or has not been completely created",
    "ToolsUnavailable": "Cannot complete operation because VMware Tools is not running in this virtual machine.",
    "NotSupported": "The operation is not supported on the object.",
    "MethodNotFound": "The requested method {method} could not be found.",
    "InvalidDatastorePath": "Invalid datastore path '{datastorePath}'.",
    "InvalidArgument": "A specified parameter was not correct: {invalidProperty}",
    "InvalidDeviceSpec": "Invalid configuration for device '{deviceIndex}'.",
    "NoDiskSpace": "There is not enough space on datastore '{datastore}'.",
}
_STATE_LABEL = {"poweredOn": "Powered on", "poweredOff": "Powered off", "suspended": "Suspended"}


# -- TLS -------------------------------------------------------------------------------------------


OWNER_KEY = "drportal.owner"  # extraConfig key holding the creating session's owner tag


def _owner_of(extra_config: Any) -> str | None:
    return next((str(opt.value) for opt in extra_config or () if opt.key == OWNER_KEY), None)


class CertificatePinMismatch(ssl.SSLError):
    """The server presented a certificate whose SHA-256 thumbprint is not the pinned one."""


def _thumbprint_of(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _normalise_thumbprint(value: str) -> str:
    hexed = re.sub(r"[\s:]", "", value).upper()
    if not re.fullmatch(r"[0-9A-F]{64}", hexed):
        raise HypervisorError(
            f"{value!r} is not a SHA-256 thumbprint (32 bytes in hex, e.g. AB:CD:…); "
            "SHA-1 thumbprints are not accepted."
        )
    return ":".join(hexed[i : i + 2] for i in range(0, 64, 2))


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        der = self.getpeercert(binary_form=True)
        pin = self.context.pin  # type: ignore[attr-defined]
        seen = _thumbprint_of(der) if der else "(no certificate)"
        if seen != pin:
            with contextlib.suppress(OSError):
                self.close()
            raise CertificatePinMismatch(
                f"the server's certificate has SHA-256 thumbprint {seen}, not the pinned {pin}"
            )


class _PinnedContext(ssl.SSLContext):
    """Accepts exactly one certificate, by its SHA-256 thumbprint, on every handshake."""

    sslsocket_class = _PinnedSocket
    pin: str


def _tls_context(thumbprint: str | None, verify: bool) -> ssl.SSLContext:
    if thumbprint:
        ctx = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # replaced by the pin check in _PinnedSocket.do_handshake
        ctx.pin = _normalise_thumbprint(thumbprint)
    elif verify:
        ctx = ssl.create_default_context()
    else:
        raise HypervisorError(
            "Refusing to connect without verifying the server's certificate: give its SHA-256 "
            "thumbprint (shown by fetch_thumbprint) or use a certificate the system CA store trusts."
        )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def fetch_thumbprint(host: str, port: int = 443, timeout: float = 10) -> str:
    """SHA-256 thumbprint ("AA:BB:…") of the certificate the server presents, unverified: show it
    to the admin on first contact, who compares it with the one vCenter displays and pins it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise HypervisorError(f"Cannot read the certificate of {host}:{port}: {exc}") from exc
    if not der:
        raise HypervisorError(f"{host}:{port} presented no certificate.")
    return _thumbprint_of(der)


# -- faults ----------------------------------------------------------------------------------------


def _fault_name(fault: BaseException) -> str:
    return type(fault).__name__.rsplit(".", 1)[-1]


def fault_message(fault: BaseException) -> str:
    """vSphere's message for a fault: its own text when it has one, else vSphere's standard text."""
    msg = str(getattr(fault, "msg", "") or "").strip()
    if msg.startswith("*types."):  # vcsim puts the Go type name in a task's localizedMessage
        msg = ""
    if not msg:
        for m in getattr(fault, "faultMessage", None) or ():
            if getattr(m, "message", None):
                msg = m.message
                break
    if not msg:
        name = _fault_name(fault)
        template = _FAULT_TEXT.get(name)
        if template:
            fields: dict[str, Any] = {}
            for key in re.findall(r"{(\w+)}", template):
                value = getattr(fault, key, "")
                if key == "state":
                    value = _STATE_LABEL.get(getattr(fault, "existingState", ""), getattr(fault, "existingState", "?"))
                elif isinstance(value, vmodl.ManagedObject):
                    value = value._moId
                fields[key] = value
            msg = template.format(**fields)
        else:
            msg = f"vSphere fault {name}"
    return msg


def _fault_error(what: str, fault: BaseException) -> HypervisorError:
    name = _fault_name(fault)
    cls: type[HypervisorError] = HypervisorError
    if name == "ManagedObjectNotFound":
        cls = NotFound
    elif name == "NoDiskSpace":
        cls = InsufficientSpace
    err = cls(f"{what}: {fault_message(fault)}")
    err.fault = name  # type: ignore[attr-defined]
    return err


# -- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a production VM can go, for the wizard. Paths are inventory paths below the root."""

    datacenters: tuple[str, ...]  # e.g. ("DC0",)
    clusters: dict[str, tuple[str, ...]]  # cluster name -> its hosts
    hosts: dict[str, str | None]  # host name -> its cluster (None: standalone)
    resource_pools: dict[str, str]  # id -> path, e.g. "resgroup-26" -> "DC0/DC0_C0/Resources"
    folders: dict[str, str]  # VM folder id -> path, e.g. "group-v3" -> "DC0/vm"


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
    "name", "config.template", "config.hardware.numCPU", "config.hardware.numCoresPerSocket",
    "config.hardware.memoryMB", "config.guestId", "config.firmware", "config.hardware.device",
    "config.files.vmPathName", "config.changeTrackingEnabled", "runtime.host", "runtime.powerState",
    "guest.toolsStatus", "guest.toolsRunningStatus", "network", "datastore", "parent",
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
    if isinstance(ctrl, vim.vm.device.VirtualAHCIController) or isinstance(ctrl, vim.vm.device.VirtualSATAController):
        return "sata"
    if isinstance(ctrl, vim.vm.device.VirtualNVMEController):
        return "nvme"
    return type(ctrl).__name__.rsplit(".", 1)[-1].lower()


def _disk_capacity(disk: Any) -> int:
    return int(disk.capacityInBytes or 0) or int(disk.capacityInKB or 0) * 1024


def _split_ds_path(path: str) -> tuple[str, str]:
    m = _DS_PATH.match(path or "")
    if not m:
        raise HypervisorError(f"Unexpected datastore path {path!r}.")
    return m.group("ds"), m.group("path").strip()


def _merge(extents: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for start, length in sorted(e for e in extents if e[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return tuple((a, n) for a, n in out)


def _once(make: Callable[[], Iterator[bytes]]) -> Callable[[], Iterator[bytes]]:
    """A body factory that refuses to run twice: streamed data cannot be sent again."""
    used = False

    def body() -> Iterator[bytes]:
        nonlocal used
        if used:
            raise HypervisorError("The streamed data was already sent once and cannot be sent again.")
        used = True
        return make()

    return body


class VSphereHypervisor:
    """vCenter (or vcsim) behind the Hypervisor Protocol; see the module docstring."""

    name = "vsphere"

    def __init__(
        self,
        host: str,
        *,
        port: int = 443,
        user: str,
        password: str,
        thumbprint: str | None = None,
        verify: bool = True,
        datastore_paths: dict[str, str] | None = None,
        transport: str = "direct",
        timeout: float = 30,
        retries: int = 3,
        task_timeout: float = 900,
    ) -> None:
        if transport not in ("direct", "network"):
            raise HypervisorError(f"Unknown transport {transport!r}: 'direct' or 'network'.")
        if timeout <= 0 or retries < 0:
            raise HypervisorError("timeout must be positive and retries not negative.")
        self.host, self.port, self.user = host, int(port), user
        self._password = password
        self.thumbprint = _normalise_thumbprint(thumbprint) if thumbprint else None
        self._ctx = _tls_context(self.thumbprint, verify)
        self.transport = transport
        self.timeout, self.retries, self.task_timeout = float(timeout), int(retries), float(task_timeout)
        self._datastore_paths = dict(datastore_paths or {})
        self._lock = threading.RLock()
        self._si: Any = None
        self._content: Any = None
        self._stub: Any = None
        self._cbt_supported: bool | None = None
        self._cbt_refusal = ""
        self._dc_of_ds: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"VSphereHypervisor({self.host!r}, port={self.port}, user={self.user!r}, transport={self.transport!r})"

    @property
    def where(self) -> str:
        return f"vCenter {self.host}:{self.port}"

    # -- session ---------------------------------------------------------------------------------

    def _api_version(self) -> str:
        """The newest API version both pyvmomi and the server speak (from vimServiceVersions.xml)."""
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ctx)
        try:
            conn.request("GET", "/sdk/vimServiceVersions.xml")
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            return DEFAULT_VERSION
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            return DEFAULT_VERSION
        offered = {v.text for v in root.iter("version") if v.text}
        for version in VmomiSupport.GetServiceVersions("vim25"):
            if VmomiSupport.versionIdMap.get(version) in offered:
                return version
        return DEFAULT_VERSION

    def _connect(self) -> None:
        version = self._api_version()
        stub = SoapStubAdapter(host=self.host, port=self.port, version=version, sslContext=self._ctx,
                               httpConnectionTimeout=self.timeout, connectionPoolTimeout=60)
        si = vim.ServiceInstance("ServiceInstance", stub)
        self._stub, self._content = stub, si.RetrieveContent()
        try:
            self._login()
        except BaseException:
            self._stub = self._content = None
            raise
        self._si = si

    def _login(self) -> None:
        try:
            self._content.sessionManager.Login(userName=self.user, password=self._password)
        except vim.fault.InvalidLogin as exc:
            raise _fault_error(f"{self.where} refused the login of {self.user!r}", exc) from None

    def _ensure(self) -> None:
        with self._lock:
            if self._si is None:
                self._guard(f"Connect to {self.where}", self._connect, idempotent=True, relogin=False)

    def close(self) -> None:
        """Log out (best effort) and drop the connections."""
        with self._lock:
            if self._content is not None:
                with contextlib.suppress(Exception):
                    self._content.sessionManager.Logout()
            if self._stub is not None:
                with contextlib.suppress(Exception):
                    self._stub.DropConnections()
            self._si = self._content = self._stub = None

    def __enter__(self) -> VSphereHypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self, what: str, fn: Callable[[], T], *, idempotent: bool = True, relogin: bool = True) -> T:
        """Run one call: bounded retries on transient errors, one re-login, vSphere's message on failure."""
        attempt, relogged = 0, not relogin
        while True:
            try:
                return fn()
            except vim.fault.NotAuthenticated as exc:
                if relogged:
                    raise _fault_error(what, exc) from None
                relogged = True
                self._guard(f"Log in to {self.where} again", self._login, relogin=False)
            except (vmodl.MethodFault, vmodl.RuntimeFault) as exc:
                raise _fault_error(what, exc) from None
            except CertificatePinMismatch as exc:
                raise HypervisorError(
                    f"{what}: refusing to talk to {self.host}:{self.port}: {exc.args[0]}. If the certificate "
                    "was replaced on purpose, check the new thumbprint and pin it."
                ) from None
            except ssl.SSLCertVerificationError as exc:
                raise HypervisorError(
                    f"{what}: the certificate of {self.host}:{self.port} is not trusted "
                    f"({exc.verify_message or exc.reason}). Pin its SHA-256 thumbprint after checking it, "
                    "or install a certificate the system CA store trusts."
                ) from None
            except HypervisorError:
                raise
            except _TRANSIENT as exc:
                attempt += 1
                never_sent = isinstance(exc, ConnectionRefusedError)
                if attempt > self.retries or not (idempotent or never_sent):
                    raise HypervisorError(f"{what}: {self._describe(exc)}{self._attempts(attempt)}") from exc
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
            except OSError as exc:
                raise HypervisorError(f"{what}: {self._describe(exc)}") from exc

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, ConnectionRefusedError):
            return f"cannot connect to {self.where}: connection refused"
        if isinstance(exc, TimeoutError):
            return f"{self.where} did not answer within {self.timeout:g} s"
        if isinstance(exc, (ConnectionError, http.client.IncompleteRead, http.client.BadStatusLine, ssl.SSLEOFError)):
            return f"lost the connection to {self.where} ({exc or type(exc).__name__})"
        if isinstance(exc, http.client.HTTPException):
            return f"{self.where} answered {exc or type(exc).__name__}"
        return f"cannot reach {self.where}: {exc}"

    @staticmethod
    def _attempts(n: int) -> str:
        return f" (after {n} attempts)" if n > 1 else ""

    def _call(self, what: str, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        self._ensure()
        return self._guard(what, fn, idempotent=idempotent)

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
                objectSet=[FS.ObjectSpec(obj=view, skip=True, selectSet=[
                    FS.TraversalSpec(name="view", type=vim.view.ContainerView, path="view", skip=False)])],
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
        return self._call(f"Read the inventory of {self.where}", lambda: self._collect_all({
            vim.HostSystem: _HOST_PROPS,
            vim.Datastore: _DS_PROPS,
            vim.Network: _NET_PROPS,
            vim.dvs.DistributedVirtualPortgroup: _DVPG_PROPS,
            vim.OpaqueNetwork: _OPAQUE_PROPS,
            vim.DistributedVirtualSwitch: _DVS_PROPS,
            vim.VirtualMachine: vm_props,
            **_PLACE_PROPS,
        }))

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
        uplinks = {u._moId for d in world.get(vim.DistributedVirtualSwitch, ()) for u in (d.get("config.uplinkPortgroup") or ())}
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
            datastores={d.get("name"): int(d.get("summary.freeSpace") or 0)
                        for d in sorted(world[vim.Datastore], key=lambda d: d.get("name"))
                        if d.get("summary.accessible", True)},
            networks=tuple(networks),
            vms=tuple(vms),
        )

    def power_states(self) -> dict[str, str]:
        """Every VM's power state (vm id -> poweredOn/poweredOff/suspended), in one round trip."""
        world = self._call(f"Read the power states in {self.where}",
                           lambda: self._collect_all({vim.VirtualMachine: ["runtime.powerState"]}))
        return {o.id: str(o.get("runtime.powerState")) for o in world[vim.VirtualMachine]}

    def host_states(self) -> dict[str, str]:
        """Host name -> connected | maintenance | disconnected | notResponding, in one round trip."""
        world = self._call(f"Read the host states in {self.where}", lambda: self._collect_all(
            {vim.HostSystem: ["name", "runtime.connectionState", "runtime.inMaintenanceMode"]}))
        return {h.get("name"): "maintenance" if h.get("runtime.inMaintenanceMode") else str(h.get("runtime.connectionState") or "connected")
                for h in world[vim.HostSystem]}

    def custom_attribute_values(self, attribute: str) -> dict[str, str]:
        """vm id -> value of the custom attribute named ``attribute`` (for replica discovery: the value
        names the source workload); VMs without a value are left out. One round trip for all VMs."""
        def read() -> dict[str, str]:
            fields = self._content.customFieldsManager.field if self._content.customFieldsManager else []
            key = next((f.key for f in fields or () if f.name == attribute), None)
            if key is None:
                return {}
            world = self._collect_all({vim.VirtualMachine: ["customValue"]})
            return {o.id: v.value for o in world[vim.VirtualMachine] for v in (o.get("customValue") or ())
                    if v.key == key and getattr(v, "value", "")}

        return self._call(f"Read custom attribute {attribute!r} in {self.where}", read)

    def placement(self) -> Placement:
        """Datacenters, clusters with their hosts, resource pools and VM folders, in one round trip."""
        world = self._call(f"Read the inventory of {self.where}", lambda: self._collect_all({
            vim.HostSystem: ["name", "parent"], **_PLACE_PROPS}))
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
            raise HypervisorError(f"Read the configuration of {vm_id}: vCenter cannot read this VM's configuration (inaccessible).")
        refs = [o.get("runtime.host")] if o.get("runtime.host") is not None else []
        refs += list(o.get("network") or ()) + list(o.get("datastore") or ())
        related = self._call(f"Read the configuration of {vm_id}", lambda: self._collect(refs, {
            vim.HostSystem: ["name"], vim.Datastore: ["name"], vim.Network: _NET_PROPS,
            vim.dvs.DistributedVirtualPortgroup: _DVPG_PROPS, vim.OpaqueNetwork: _OPAQUE_PROPS})) if refs else []
        world: dict[type, list[_Obj]] = {}
        for r in related:
            for t in (vim.HostSystem, vim.Datastore, vim.dvs.DistributedVirtualPortgroup, vim.OpaqueNetwork, vim.Network):
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
            vm_id=o.id, name=o.get("name"), host=names.get(host._moId, host._moId) if host is not None else "",
            cpus=int(o.get("config.hardware.numCPU") or 0), memory_mb=int(o.get("config.hardware.memoryMB") or 0),
            guest_os=o.get("config.guestId") or "", firmware=o.get("config.firmware") or "bios",
            disks=tuple(sorted(disks, key=lambda s: s.key)), nics=tuple(nics),
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

    # -- lifecycle ---------------------------------------------------------------------------------

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
        datacenter's VM folder. Refused before anything is created: an unknown host, datastore,
        network, pool or folder (NotFound), a source network missing from the map or a VM name
        already in use (HypervisorError), a datastore without room for all disks (InsufficientSpace).
        """
        what = f"Create {name!r} like {source_vm_id}"
        src = self._vm_props(source_vm_id, _VM_PROPS, f"Read the configuration of {source_vm_id}")
        devices = list(src.get("config.hardware.device") or ())
        world = self._world(["name"])
        names = self._names(world)
        source_cfg = self._config(src, names)
        by_id = {o.id: o for objs in world.values() for o in objs}

        # where
        target_host = next((h for h in world[vim.HostSystem] if h.get("name") == host), None)
        cluster = next((c for c in world[vim.ComputeResource] if c.get("name") == host
                        and isinstance(c.ref, vim.ClusterComputeResource)), None)
        if target_host is None and cluster is None:
            raise NotFound(f"{what}: no host or cluster named {host!r} in {self.where}.")
        ds = next((d for d in world[vim.Datastore] if d.get("name") == datastore), None)
        if ds is None:
            raise NotFound(f"{what}: no datastore named {datastore!r} in {self.where}.")
        if target_host is not None:
            compute = by_id.get(target_host.get("parent")._moId)
            mounted = {r._moId for r in target_host.get("datastore") or ()}
        else:
            compute = cluster
            mounted = {r._moId for r in cluster.get("datastore") or ()}
        if ds.id not in mounted:
            raise HypervisorError(f"{what}: datastore {datastore!r} is not available on {host!r}.")
        if resource_pool is not None:
            pool_obj = by_id.get(resource_pool)
            if pool_obj is None or not isinstance(pool_obj.ref, vim.ResourcePool):
                raise NotFound(f"{what}: no resource pool {resource_pool!r} in {self.where}.")
            pool = pool_obj.ref
        else:
            pool = compute.get("resourcePool") if compute is not None else None
            if pool is None:
                raise HypervisorError(f"{what}: {host!r} has no resource pool.")
        dc = compute
        while dc is not None and not isinstance(dc.ref, vim.Datacenter):
            dc = by_id.get(getattr(dc.get("parent"), "_moId", ""))
        if folder is not None:
            folder_obj = by_id.get(folder)
            if folder_obj is None or not isinstance(folder_obj.ref, vim.Folder) or "VirtualMachine" not in (folder_obj.get("childType") or ()):
                raise NotFound(f"{what}: no VM folder {folder!r} in {self.where}.")
            vm_folder = folder_obj.ref
        elif dc is not None:
            vm_folder = dc.get("vmFolder")
        else:
            raise HypervisorError(f"{what}: cannot find the datacenter of {host!r}.")

        # what
        if any(v.get("name") == name for v in world[vim.VirtualMachine]):
            raise HypervisorError(f"{what}: The name '{name}' already exists.")
        nets = {n.get("name"): n for n in self._networks(world)}
        dvs_uuid = {d.id: d.get("uuid") for d in world[vim.DistributedVirtualSwitch]}
        for target in network_map.values():
            if target is not None and target not in nets:
                raise NotFound(f"{what}: no network named {target!r} in {self.where}.")
        # vSphere wants a backing even for a NIC that is not connected: such a NIC gets the first
        # standard network of the target (it never connects by itself: startConnected is false).
        reachable = {r._moId for r in (target_host or cluster).get("network") or ()}
        parking = next((n for n in sorted(world[vim.Network], key=lambda n: n.get("name"))
                        if type(n.ref) is vim.Network and n.id in reachable), None)
        needed = sum(d.capacity_bytes for d in source_cfg.disks)
        free = int(ds.get("summary.freeSpace") or 0)
        if needed > free:
            raise InsufficientSpace(
                f"{what}: Insufficient disk space on datastore '{datastore}': {needed} bytes needed, {free} free."
            )

        spec = vim.vm.ConfigSpec(
            name=name, guestId=src.get("config.guestId"), numCPUs=src.get("config.hardware.numCPU"),
            numCoresPerSocket=src.get("config.hardware.numCoresPerSocket"), memoryMB=src.get("config.hardware.memoryMB"),
            firmware=src.get("config.firmware") or "bios", changeTrackingEnabled=True,
            files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"), deviceChange=[],
        )
        if owner_tag:  # proof of creation, readable even when the answer to CreateVM_Task is lost
            spec.extraConfig = [vim.option.OptionValue(key=OWNER_KEY, value=owner_tag)]
            spec.annotation = f"Created by the failback portal ({OWNER_KEY}={owner_tag})"
        Op = vim.vm.device.VirtualDeviceSpec
        by_key = {d.key: d for d in devices}
        new_ctrl: dict[int, int] = {}  # source controller key -> key in the new VM
        next_key = -100

        def controller_for(src_key: int) -> int:
            nonlocal next_key
            if src_key in new_ctrl:
                return new_ctrl[src_key]
            ctrl = by_key[src_key]
            if isinstance(ctrl, vim.vm.device.VirtualIDEController):
                new_ctrl[src_key] = 200 + ctrl.busNumber  # every VM has IDE 0 and 1 under these keys
                return new_ctrl[src_key]
            copy = type(ctrl)(key=next_key, busNumber=ctrl.busNumber)
            if isinstance(ctrl, vim.vm.device.VirtualSCSIController):
                copy.sharedBus = ctrl.sharedBus or "noSharing"
            spec.deviceChange.append(Op(operation="add", device=copy))
            new_ctrl[src_key] = next_key
            next_key -= 1
            return new_ctrl[src_key]

        for d in devices:
            if not isinstance(d, vim.vm.device.VirtualDisk):
                continue
            b = d.backing
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{datastore}]", diskMode="persistent",
                thinProvisioned=bool(getattr(b, "thinProvisioned", False)),
                eagerlyScrub=bool(getattr(b, "eagerlyScrub", False)),
            )
            capacity = _disk_capacity(d)
            disk = vim.vm.device.VirtualDisk(key=next_key, controllerKey=controller_for(d.controllerKey),
                                             unitNumber=d.unitNumber, capacityInBytes=capacity,
                                             capacityInKB=capacity // 1024, backing=backing)
            next_key -= 1
            spec.deviceChange.append(Op(operation="add", fileOperation="create", device=disk))

        cards = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), key=lambda d: d.key)
        for i, (card, nic) in enumerate(zip(cards, source_cfg.nics)):
            if nic.network is None:
                target = None
            elif nic.network in network_map:
                target = network_map[nic.network]
            else:
                raise HypervisorError(f"{what}: no mapping given for network {nic.network!r} ({nic.key}) of {src.get('name')}.")
            new = type(card)(key=next_key, addressType="generated", wakeOnLanEnabled=card.wakeOnLanEnabled)
            next_key -= 1
            new.connectable = vim.vm.device.VirtualDevice.ConnectInfo(
                startConnected=target is not None, connected=False, allowGuestControl=target is not None)
            if target is None and parking is None:
                raise HypervisorError(f"{what}: {host!r} has no standard network to park the disconnected {nic.key} on.")
            net = nets[target] if target is not None else parking
            if isinstance(net.ref, vim.dvs.DistributedVirtualPortgroup):
                switch = net.get("config.distributedVirtualSwitch")
                new.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                    port=vim.dvs.PortConnection(portgroupKey=net.get("key") or net.id,
                                                switchUuid=dvs_uuid.get(switch._moId) if switch is not None else None))
            elif isinstance(net.ref, vim.OpaqueNetwork):
                summary = net.get("summary")
                new.backing = vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo(
                    opaqueNetworkId=summary.opaqueNetworkId, opaqueNetworkType=summary.opaqueNetworkType)
            else:
                new.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=net.get("name"), network=net.ref)
            spec.deviceChange.append(Op(operation="add", device=new))

        host_ref = target_host.ref if target_host is not None else None
        task = self._call(what, lambda: vm_folder.CreateVM_Task(config=spec, pool=pool, host=host_ref), idempotent=False)
        ref = self._wait(task, what)
        return ref._moId

    def _wait(self, task: Any, what: str) -> Any:
        """Wait for a task (polling its info); its result, or its fault's message as HypervisorError."""
        deadline = time.monotonic() + self.task_timeout
        pause = 0.05
        while True:
            objs = self._call(what, lambda: self._collect([task], {vim.Task: ["info.state", "info.error", "info.result"]}))
            props = objs[0].props if objs else {}
            state = props.get("info.state")
            if state == "success":
                return props.get("info.result")
            if state == "error":
                fault = props.get("info.error")
                raise _fault_error(what, fault) if fault is not None else HypervisorError(f"{what}: the task failed.")
            if time.monotonic() >= deadline:
                raise HypervisorError(f"{what}: vCenter task {task._moId} still running after {self.task_timeout:g} s.")
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def delete_vm(self, vm_id: str) -> None:
        """Destroy_Task (unregister and delete the files); refused unless the VM is powered off."""
        what = f"Delete {vm_id}"
        o = self._vm_props(vm_id, ["name", "runtime.powerState"], what)
        state = o.get("runtime.powerState")
        if state != POWERED_OFF:
            raise HypervisorError(f"Delete {o.get('name')} ({vm_id}): The attempted operation cannot be performed "
                                  f"in the current state ({_STATE_LABEL.get(state, state)}).")
        task = self._call(what, lambda: self._vm_ref(vm_id).Destroy_Task(), idempotent=False)
        self._wait(task, f"Delete {o.get('name')} ({vm_id})")

    def vm_owner(self, vm_id: str) -> str | None:
        o = self._vm_props(vm_id, ["config.extraConfig"], f"Read the owner of {vm_id}")
        return _owner_of(o.get("config.extraConfig"))

    def find_owned_vm(self, owner_tag: str) -> str | None:
        if not owner_tag:
            return None
        world = self._call(f"Find the VM owned by {owner_tag}", lambda: self._collect_all({vim.VirtualMachine: ["config.extraConfig"]}))
        return next((o.ref._moId for o in world[vim.VirtualMachine] if _owner_of(o.get("config.extraConfig")) == owner_tag), None)

    def power_state(self, vm_id: str) -> str:
        return self._vm_props(vm_id, ["runtime.powerState"], f"Read the power state of {vm_id}").get("runtime.powerState")

    def power_on(self, vm_id: str) -> None:
        what = f"Power on {vm_id}"
        task = self._call(what, lambda: self._vm_ref(vm_id).PowerOnVM_Task(), idempotent=False)
        self._wait(task, what)

    def power_off(self, vm_id: str) -> None:
        """Hard power off, at once."""
        what = f"Power off {vm_id}"
        task = self._call(what, lambda: self._vm_ref(vm_id).PowerOffVM_Task(), idempotent=False)
        self._wait(task, what)

    def tools_running(self, vm_id: str) -> bool:
        o = self._vm_props(vm_id, ["guest.toolsRunningStatus"], f"Read the guest tools state of {vm_id}")
        return o.get("guest.toolsRunningStatus") == "guestToolsRunning"

    def shutdown_guest(self, vm_id: str) -> None:
        """ShutdownGuest: ask the guest OS to shut down; returns at once (poll power_state).
        vSphere refuses it without running tools (ToolsUnavailable) or when not powered on."""
        what = f"Shut down the guest of {vm_id}"
        self._call(what, lambda: self._vm_ref(vm_id).ShutdownGuest(), idempotent=False)

    # -- disks: direct transport --------------------------------------------------------------------

    def _disk(self, vm_id: str, disk_key: str, what: str) -> tuple[_Obj, Any]:
        o = self._vm_props(vm_id, ["name", "config.hardware.device", "config.changeTrackingEnabled",
                                   "capability.changeTrackingSupported", "datastore"], what)
        devices = list(o.get("config.hardware.device") or ())
        by_key = {d.key: d for d in devices}
        for d in devices:
            if isinstance(d, vim.vm.device.VirtualDisk):
                ctrl = by_key.get(d.controllerKey)
                if f"{_controller_prefix(ctrl)}{getattr(ctrl, 'busNumber', 0)}:{d.unitNumber}" == disk_key:
                    return o, d
        raise NotFound(f"{o.get('name')} ({vm_id}) has no disk {disk_key!r}.")

    @staticmethod
    def _flat_name(path: str) -> str:
        return path[: -len(".vmdk")] + "-flat.vmdk" if path.endswith(".vmdk") else path

    def _local_root(self, datastore: str) -> str:
        if datastore not in self._datastore_paths:
            self._learn_datastores(self._world(["name"]))
        root = self._datastore_paths.get(datastore)
        if not root:
            raise HypervisorError(
                f"Datastore {datastore!r} is not mounted here: set datastore_paths[{datastore!r}] to its local "
                "mount point (direct transport) or use the network transport."
            )
        return root

    def disk_path(self, vm_id: str, disk_key: str) -> str:
        """The local file holding the disk's raw bytes (direct transport): ``<disk>-flat.vmdk`` under the
        datastore's mount point, or a ``.vmdk`` that is itself the full-size extent. A missing or short
        flat file (vcsim leaves it empty) is created or extended, sparse, to the disk's capacity."""
        if self.transport != "direct":
            raise HypervisorError("disk_path() needs the direct transport; this connection uses the network transport.")
        o, disk = self._disk(vm_id, disk_key, f"Find disk {disk_key} of {vm_id}")
        b = disk.backing
        if getattr(b, "parent", None) is not None:
            raise HypervisorError(f"Disk {disk_key} of {o.get('name')} ({vm_id}) has snapshots: its data spans a delta "
                                  "chain; remove or consolidate the snapshots first.")
        ds, rel = _split_ds_path(getattr(b, "fileName", "") or "")
        root = os.path.realpath(self._local_root(ds))
        capacity = _disk_capacity(disk)
        descriptor = os.path.realpath(os.path.join(root, rel))
        flat = os.path.realpath(os.path.join(root, self._flat_name(rel)))
        for p in (descriptor, flat):
            if os.path.commonpath([root, p]) != root:
                raise HypervisorError(f"Disk {disk_key} of {vm_id}: path {b.fileName!r} leaves the datastore.")
        if not os.path.exists(flat) and os.path.exists(descriptor) and os.path.getsize(descriptor) == capacity:
            return descriptor  # a monolithic flat disk: the .vmdk is the data
        size = os.path.getsize(flat) if os.path.exists(flat) else 0
        if size > capacity:
            raise HypervisorError(f"Disk {disk_key} of {vm_id}: {flat} holds {size} bytes, more than the disk's {capacity}.")
        if size < capacity:
            with open(flat, "ab") as f:
                f.truncate(capacity)  # sparse: reads as zeros, as the platform's empty disk does
        return flat

    # -- disks: network transport -------------------------------------------------------------------

    def _disk_location(self, vm_id: str, disk_key: str, what: str) -> tuple[str, str, str, int]:
        """(datastore, path of the flat extent in it, datacenter path, capacity) of a disk."""
        o, disk = self._disk(vm_id, disk_key, what)
        ds, rel = _split_ds_path(getattr(disk.backing, "fileName", "") or "")
        if getattr(disk.backing, "parent", None) is not None:
            raise HypervisorError(f"{what}: the disk has snapshots; remove or consolidate them first.")
        if ds not in self._dc_of_ds:
            self._learn_datastores(self._world(["name"]))
        dc = self._dc_of_ds.get(ds)
        if dc is None:
            raise NotFound(f"{what}: cannot find the datacenter of datastore {ds!r}.")
        return ds, self._flat_name(rel), dc, _disk_capacity(disk)

    def _session_cookie(self) -> str:
        cookie = SimpleCookie()
        cookie.load(self._stub.cookie or "")
        morsel = cookie.get("vmware_soap_session")
        if morsel is None:
            raise HypervisorError(f"No API session with {self.where} to authorise a file transfer.")
        return 'vmware_soap_session="{}"'.format(morsel.value.strip('"'))

    def _file_request(self, what: str, method: str, ds: str, path: str, dc: str, *,
                      headers: dict[str, str] | None = None, body: Any = None,
                      handle: Callable[[http.client.HTTPResponse], T], idempotent: bool) -> T:
        url = "/folder/" + quote(path) + "?" + urlencode({"dcPath": dc, "dsName": ds})

        def once() -> T:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ctx)
            try:
                hdrs = {"Cookie": self._session_cookie(), **(headers or {})}
                conn.request(method, url, body=body() if callable(body) else body, headers=hdrs)
                resp = conn.getresponse()
                if resp.status in (401, 403):
                    resp.read()
                    raise vim.fault.NotAuthenticated(msg=f"{self.where} answered {resp.status} {resp.reason} to {method} {path}")
                if resp.status >= 500:
                    raise http.client.HTTPException(f"{resp.status} {resp.reason}")
                return handle(resp)
            finally:
                conn.close()

        return self._call(what, once, idempotent=idempotent)

    def download_range(self, vm_id: str, disk_key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the disk from ``offset``, by a ranged GET on the datastore file interface.
        Bytes past the end of a flat file shorter than the disk (vcsim's empty files) read as zeros."""
        what = f"Read {length} bytes at {offset} of disk {disk_key} of {vm_id}"
        ds, path, dc, capacity = self._disk_location(vm_id, disk_key, what)
        if offset < 0 or length < 0 or offset + length > capacity:
            raise HypervisorError(f"{what}: outside the disk ({capacity} bytes).")
        if length == 0:
            return b""

        def handle(resp: http.client.HTTPResponse) -> bytes:
            if resp.status == 206:
                data = resp.read()
            elif resp.status == 416:  # the file ends before offset
                resp.read()
                data = b""
            elif resp.status == 404:
                resp.read()
                raise NotFound(f"{what}: {path} not found on datastore {ds}.")
            elif resp.status == 200:
                resp.close()
                raise HypervisorError(f"{what}: {self.where} ignored the byte range; refusing to download the whole file.")
            else:
                body = resp.read(512).decode(errors="replace")
                raise HypervisorError(f"{what}: {self.where} answered {resp.status} {resp.reason} {body}".strip())
            if len(data) > length:
                raise HypervisorError(f"{what}: the server sent {len(data)} bytes.")
            return data + bytes(length - len(data))

        return self._file_request(what, "GET", ds, path, dc, headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                                  handle=handle, idempotent=True)

    def upload_disk(self, vm_id: str, disk_key: str, source_path: str) -> int:
        """Replace the disk's whole content with the local file ``source_path`` (exactly the disk's size)
        by one streaming PUT; returns the bytes sent. The file interface cannot write a byte range, so
        in network mode phase 2 sends the whole disk again, not only the changed blocks."""
        what = f"Upload {source_path} to disk {disk_key} of {vm_id}"
        ds, path, dc, capacity = self._disk_location(vm_id, disk_key, what)
        size = os.path.getsize(source_path)
        if size != capacity:
            raise HypervisorError(f"{what}: the file has {size} bytes, the disk {capacity}.")

        def body() -> Iterator[bytes]:
            with open(source_path, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return self._put(what, ds, path, dc, body, size, idempotent=True)

    def copy_disk_network(self, src_vm_id: str, dst_vm_id: str, disk_key: str) -> int:
        """Stream one disk from a VM to another (same key and size) through this machine: a GET of the
        source's flat file piped into a PUT of the target's; returns the bytes sent. Whole file, always."""
        what = f"Copy disk {disk_key} from {src_vm_id} to {dst_vm_id}"
        sds, spath, sdc, scap = self._disk_location(src_vm_id, disk_key, what)
        dds, dpath, ddc, dcap = self._disk_location(dst_vm_id, disk_key, what)
        if scap != dcap:
            raise HypervisorError(f"{what}: the disks differ in size ({scap} and {dcap} bytes).")

        def handle(resp: http.client.HTTPResponse) -> int:
            if resp.status != 200:
                raise HypervisorError(f"{what}: {self.where} answered {resp.status} {resp.reason} to the download.")

            def body() -> Iterator[bytes]:
                sent = 0
                while sent < scap and (chunk := resp.read(min(CHUNK, scap - sent))):
                    sent += len(chunk)
                    yield chunk
                while sent < scap:  # a flat file shorter than the disk: the rest is zeros
                    n = min(CHUNK, scap - sent)
                    sent += n
                    yield bytes(n)

            return self._put(what, dds, dpath, ddc, _once(body), scap, idempotent=False)

        return self._file_request(what, "GET", sds, spath, sdc, handle=handle, idempotent=False)

    def _put(self, what: str, ds: str, path: str, dc: str, body: Callable[[], Iterator[bytes]], size: int,
             *, idempotent: bool) -> int:
        def handle(resp: http.client.HTTPResponse) -> int:
            text = resp.read(512).decode(errors="replace")
            if resp.status not in (200, 201, 204):
                raise HypervisorError(f"{what}: {self.where} answered {resp.status} {resp.reason} {text}".strip())
            return size

        return self._file_request(what, "PUT", ds, path, dc,
                                  headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                                  body=body, handle=handle, idempotent=idempotent)

    # -- change tracking ----------------------------------------------------------------------------

    def _cbt_available(self, vm_id: str, disk: Any) -> bool:
        """Whether the platform answers QueryChangedDiskAreas, probed once per connection: a fault
        saying the method does not exist (vcsim: MethodNotFound) means no; any other answer, yes."""
        if self._cbt_supported is None:
            try:
                self._call(f"Probe QueryChangedDiskAreas on {vm_id}", lambda: self._vm_ref(vm_id).QueryChangedDiskAreas(
                    snapshot=None, deviceKey=disk.key, startOffset=0, changeId="*"))
                self._cbt_supported = True
            except HypervisorError as exc:
                if getattr(exc, "fault", "") in ("MethodNotFound", "NotImplemented", "NotSupported"):
                    self._cbt_supported, self._cbt_refusal = False, str(exc)
                else:
                    self._cbt_supported = True  # it exists; it just wants a snapshot or a valid id
        return self._cbt_supported

    def change_tracking(self, vm_id: str, disk_key: str) -> str | None:
        """The disk's current changeId, or None when changes cannot be tracked: change tracking off
        on the VM, a platform without QueryChangedDiskAreas (vcsim), a VM that says it cannot track,
        or no change id yet. None makes the caller compare block digests instead.

        The id is the one vSphere shows on the disk now, which may lag the disk's true state: a
        later changed_areas() since it returns a superset of the changes, never less."""
        o, disk = self._disk(vm_id, disk_key, f"Read change tracking of disk {disk_key} of {vm_id}")
        if not o.get("config.changeTrackingEnabled") or not self._cbt_available(vm_id, disk):
            return None
        if o.get("capability.changeTrackingSupported") is False:
            return None
        return getattr(disk.backing, "changeId", None) or None

    def changed_areas(self, vm_id: str, disk_key: str, since_change_id: str) -> ChangedAreas:
        """QueryChangedDiskAreas since ``since_change_id``, on a temporary snapshot (vSphere answers
        for a snapshot's disk state); the snapshot's change id is the one to pass next time. Extents
        are merged and sorted. The snapshot is removed again, also on failure; if that removal fails
        after a successful query, this raises (a forgotten snapshot keeps growing on the datastore)."""
        what = f"Read changed areas of disk {disk_key} of {vm_id}"
        o, disk = self._disk(vm_id, disk_key, what)
        if not o.get("config.changeTrackingEnabled"):
            raise HypervisorError(f"{what}: change tracking is not enabled on {o.get('name')}.")
        if not self._cbt_available(vm_id, disk):
            raise HypervisorError(f"{what}: this platform cannot report changed areas ({self._cbt_refusal}).")
        vm = self._vm_ref(vm_id)
        task = self._call(what, lambda: vm.CreateSnapshot_Task(
            name="failback-cbt", description="Temporary: changed block query for failback", memory=False, quiesce=False),
            idempotent=False)
        snapshot = self._wait(task, what)
        try:
            areas = self._query_changes(vm, snapshot, disk, since_change_id, what)
        except BaseException:
            with contextlib.suppress(HypervisorError):
                self._remove_snapshot(snapshot, vm_id)
            raise
        self._remove_snapshot(snapshot, vm_id)
        return areas

    def _remove_snapshot(self, snapshot: Any, vm_id: str) -> None:
        what = f"Remove the temporary snapshot 'failback-cbt' of {vm_id}"
        task = self._call(what, lambda: snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True), idempotent=False)
        self._wait(task, what)

    def _query_changes(self, vm: Any, snapshot: Any, disk: Any, since_change_id: str, what: str) -> ChangedAreas:
        snap = self._call(what, lambda: self._collect([snapshot], {vim.vm.Snapshot: ["config.hardware.device"]}))
        snap_disk = next((d for d in (snap[0].get("config.hardware.device") if snap else ()) or ()
                          if isinstance(d, vim.vm.device.VirtualDisk) and d.key == disk.key), None)
        new_id = getattr(getattr(snap_disk, "backing", None), "changeId", None)
        if not new_id:
            raise HypervisorError(f"{what}: the snapshot has no change id for the disk.")
        capacity, offset, extents = _disk_capacity(disk), 0, []
        while offset < capacity:
            info = self._call(what, lambda: vm.QueryChangedDiskAreas(
                snapshot=snapshot, deviceKey=disk.key, startOffset=offset, changeId=since_change_id))
            extents += [(int(e.start), int(e.length)) for e in info.changedArea or ()]
            end = int(info.startOffset) + int(info.length)
            if end <= offset:
                break
            offset = end
        return ChangedAreas(change_id=new_id, extents=_merge(extents))

    # -- connection test -----------------------------------------------------------------------------

    def about(self) -> str:
        """vCenter's product name and version (e.g. "VMware vCenter Server 8.0.2 build-…"), after a
        login and an authenticated call: the "Test connection" button."""
        self._call(f"Test the connection to {self.where}", lambda: self._si.CurrentTime())
        return self._content.about.fullName
