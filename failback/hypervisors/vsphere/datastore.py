"""Disk data: the flat extent on a locally mounted datastore (direct transport), or the datastore HTTP
file interface (``/folder/<path>?dcPath=…&dsName=…``) with the API session's cookie.

- ``"direct"``: ``disk_path()`` returns the disk's flat extent (``<disk>-flat.vmdk``) on a locally
  mounted datastore (NFS, or vcsim's directories): ``datastore_paths[name]`` gives the mount point;
  by default a datastore whose ``summary.url`` is a local directory is used as is (vcsim).
- ``"network"``: ``download_range()`` (a ranged GET) and ``copy_disk_network()`` (the source's GET
  piped into a streaming PUT of the target's whole file). The interface cannot write a range, so in
  network mode phase 2 re-sends the whole disk, not only the changes: say so to the admin. The PUT
  carries the zeros too and the server writes them, so the target comes out fully allocated whatever
  the source's holes (tests/test_vsphere_sparse.py); only the direct transport keeps a disk sparse.

``download_range`` and ``copy_disk_network`` use the file interface whatever the transport.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from pyVmomi import vim

from ..base import HypervisorError, NbdExport, NotFound
from .inventory import _disk_capacity, _split_ds_path

T = TypeVar("T")

MiB = 1 << 20
CHUNK = 4 * MiB  # file transfer buffer


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


class DatastoreFiles:
    """The disk-data part of ``VSphereHypervisor`` (it keeps ``transport`` and ``_datastore_paths``)."""

    transport: str
    vddk_libdir: str | None
    host: str
    port: int
    user: str
    timeout: float
    _password: str
    _ctx: ssl.SSLContext
    _datastore_paths: dict[str, str]

    # -- direct transport ------------------------------------------------------------------------

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
            raise HypervisorError(
                f"disk_path() needs the direct transport; this connection uses the {self.transport} transport."
            )
        return self._flat_file(vm_id, disk_key)

    def nbd_export(self, vm_id: str, disk_key: str, *, writable: bool, snapshot: str | None = None) -> NbdExport:
        """How nbdkit serves the disk (nbd transport). With a VDDK library (``vddk_libdir``): the ``vddk``
        plugin, logging in to this vCenter with this connection's account and thumbprint, opening the
        disk of VM ``vm_id`` (its moref) by its descriptor file, from ``snapshot`` (a snapshot moref)
        when given, over NBDSSL (NBD as the fallback). Not run by the tests: Debian's nbdkit has no
        vddk plugin and VDDK cannot be downloaded without an account (see README, "The NBD
        transport"). Without one: the ``file`` plugin on the flat file of a mounted datastore
        (``datastore_paths``, as direct mode), which is what the vcsim tests serve."""
        if not self.vddk_libdir:
            if snapshot is not None:
                raise HypervisorError("Reading a snapshot over NBD needs the vddk plugin (set the VDDK library).")
            return NbdExport("file", (f"file={self._flat_file(vm_id, disk_key)}",), readonly=not writable)
        _, disk = self._disk(vm_id, disk_key, f"Find disk {disk_key} of {vm_id}")
        args = [
            f"libdir={self.vddk_libdir}",
            f"server={self.host}",
            f"port={self.port}",
            f"user={self.user}",
            f"thumbprint={self._vddk_thumbprint()}",
            f"vm=moref={vm_id}",
            f"file={disk.backing.fileName}",
            "transports=nbdssl:nbd",
        ]
        if snapshot is not None:
            args.append(f"snapshot={snapshot}")
        return NbdExport("vddk", tuple(args), readonly=not writable, password=self._password, verified=False)

    def _vddk_thumbprint(self) -> str:
        """The SHA-1 thumbprint VDDK wants, of the certificate this connection verifies (its pinned
        SHA-256 thumbprint, or the CA chain): read over a handshake with the connection's own checks."""
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=self.timeout) as raw,
                self._ctx.wrap_socket(raw, server_hostname=self.host) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError) as exc:
            raise HypervisorError(f"Cannot read the certificate of {self.where} for VDDK: {exc}") from exc
        return ":".join(f"{b:02X}" for b in hashlib.sha1(der or b"").digest())

    def _flat_file(self, vm_id: str, disk_key: str) -> str:
        o, disk = self._disk(vm_id, disk_key, f"Find disk {disk_key} of {vm_id}")
        b = disk.backing
        if getattr(b, "parent", None) is not None:
            raise HypervisorError(
                f"Disk {disk_key} of {o.get('name')} ({vm_id}) has snapshots: its data spans a delta "
                "chain; remove or consolidate the snapshots first."
            )
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
            raise HypervisorError(
                f"Disk {disk_key} of {vm_id}: {flat} holds {size} bytes, more than the disk's {capacity}."
            )
        if size < capacity:
            with open(flat, "ab") as f:
                f.truncate(capacity)  # sparse: reads as zeros, as the platform's empty disk does
        return flat

    # -- the datastore HTTP file interface -------------------------------------------------------

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

    def _file_request(
        self,
        what: str,
        method: str,
        ds: str,
        path: str,
        dc: str,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
        handle: Callable[[http.client.HTTPResponse], T],
        idempotent: bool,
    ) -> T:
        url = "/folder/" + quote(path) + "?" + urlencode({"dcPath": dc, "dsName": ds})

        def once() -> T:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ctx)
            try:
                hdrs = {"Cookie": self._session_cookie(), **(headers or {})}
                conn.request(method, url, body=body() if callable(body) else body, headers=hdrs)
                resp = conn.getresponse()
                if resp.status in (401, 403):
                    resp.read()
                    raise vim.fault.NotAuthenticated(
                        msg=f"{self.where} answered {resp.status} {resp.reason} to {method} {path}"
                    )
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
                raise HypervisorError(
                    f"{what}: {self.where} ignored the byte range; refusing to download the whole file."
                )
            else:
                body = resp.read(512).decode(errors="replace")
                raise HypervisorError(f"{what}: {self.where} answered {resp.status} {resp.reason} {body}".strip())
            if len(data) > length:
                raise HypervisorError(f"{what}: the server sent {len(data)} bytes.")
            return data + bytes(length - len(data))

        return self._file_request(
            what,
            "GET",
            ds,
            path,
            dc,
            headers={"Range": f"bytes={offset}-{offset + length - 1}"},
            handle=handle,
            idempotent=True,
        )

    def copy_disk_network(
        self, src_vm_id: str, dst_vm_id: str, disk_key: str, *, progress: Callable[[int], None] | None = None
    ) -> int:
        """Stream one disk from a VM to another (same key and size) through this machine: a GET of the
        source's flat file piped into a PUT of the target's; returns the bytes sent. Whole file, always.

        ``progress(sent)`` is called in the calling thread after each chunk went out (every 4 MiB), with
        the bytes sent so far; it may sleep (a bandwidth limit) or raise to stop the copy, which then
        propagates and leaves the target incomplete."""
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
                    if progress is not None:
                        progress(sent)
                while sent < scap:  # a flat file shorter than the disk: the rest is zeros
                    n = min(CHUNK, scap - sent)
                    sent += n
                    yield bytes(n)
                    if progress is not None:
                        progress(sent)

            return self._put(what, dds, dpath, ddc, _once(body), scap, idempotent=False)

        return self._file_request(what, "GET", sds, spath, sdc, handle=handle, idempotent=False)

    def _put(
        self,
        what: str,
        ds: str,
        path: str,
        dc: str,
        body: Callable[[], Iterator[bytes]],
        size: int,
        *,
        idempotent: bool,
    ) -> int:
        def handle(resp: http.client.HTTPResponse) -> int:
            text = resp.read(512).decode(errors="replace")
            if resp.status not in (200, 201, 204):
                raise HypervisorError(f"{what}: {self.where} answered {resp.status} {resp.reason} {text}".strip())
            return size

        return self._file_request(
            what,
            "PUT",
            ds,
            path,
            dc,
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            body=body,
            handle=handle,
            idempotent=idempotent,
        )
