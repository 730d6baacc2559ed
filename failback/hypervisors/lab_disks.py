"""The lab's disks: data read and written by range, guest writes with their change log, and change
tracking like vSphere's CBT at 64 KiB granularity (see ``lab``'s docstring for the files and the change
id format). ``LabDisks`` is the disk part of ``LabHypervisor``; it relies on the VM storage methods
there (``_vm``, ``_disk``, ``_disk_file``, ``_locked``, ``_lab``, ``_vms``, ``_provisioned``).

No Django here: the standard library only.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .base import POWERED_ON, ChangedAreas, HypervisorError, InsufficientSpace, NbdExport

KiB, MiB = 1024, 1024**2
BLOCK_SIZE = 64 * KiB  # change tracking granularity
_RECORD = struct.Struct("<I")  # one change record: the index of a 64 KiB block written


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


def _data_extents(fd: int, capacity: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the file's allocated data below ``capacity``, in order (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < capacity:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if data >= capacity:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), capacity)
        yield data, hole - data
        pos = hole


class LabDisks:
    """Disk data and change tracking of the lab's VMs."""

    # -- disks ---------------------------------------------------------------------
    def extend_disk(self, vm_id: str, disk_key: str, capacity_bytes: int) -> None:
        """Grow a disk, as an administrator does in vCenter while the VM runs: the new space reads as
        zeros and is not allocated; the change log goes on. Disks only grow (vSphere cannot shrink them)."""
        with self._locked():
            vm = self._vm(vm_id)
            disk = self._disk(vm, disk_key)
            if capacity_bytes < disk["capacity_bytes"]:
                raise HypervisorError(
                    f"Disk {disk_key} of {vm['name']} is {disk['capacity_bytes']} bytes: a disk cannot shrink."
                )
            self._check_room(disk["datastore"], capacity_bytes - disk["capacity_bytes"])
            with open(self._disk_file(vm, disk), "r+b") as f:
                f.truncate(capacity_bytes)
            disk["capacity_bytes"] = int(capacity_bytes)
            self._save_vm(vm)

    def add_disk(self, vm_id: str, capacity_bytes: int) -> str:
        """Give a VM one more empty sparse disk on its own datastore (hot add); return its key."""
        if capacity_bytes <= 0:
            raise HypervisorError("A disk's capacity must be positive.")
        with self._locked():
            vm = self._vm(vm_id)
            taken = {d["key"] for d in vm["disks"]}
            key = next(f"scsi0:{i}" for i in range(len(taken) + 1) if f"scsi0:{i}" not in taken)
            self._check_room(vm["datastore"], capacity_bytes)
            disk = {"key": key, "capacity_bytes": int(capacity_bytes), "datastore": vm["datastore"], "thin": True}
            self._vm_dir(disk["datastore"], vm_id).mkdir(parents=True, exist_ok=True)
            with open(self._disk_file(vm, disk), "wb") as f:
                f.truncate(capacity_bytes)
            disk["ctk_epoch"] = uuid.uuid4().hex[:12]
            with open(self._disk_file(vm, disk, ".ctk"), "wb"):
                pass
            vm["disks"].append(disk)
            self._save_vm(vm)
            return key

    def _check_room(self, datastore: str, more: int) -> None:
        free = self._lab()["datastores"][datastore] - self._provisioned(self._vms()).get(datastore, 0)
        if more > free:
            raise InsufficientSpace(
                f"Insufficient disk space on datastore '{datastore}': {more} bytes needed, {max(free, 0)} free."
            )

    def disk_path(self, vm_id: str, disk_key: str) -> str:
        vm = self._vm(vm_id)
        return str(self._disk_file(vm, self._disk(vm, disk_key)))

    def nbd_export(self, vm_id: str, disk_key: str, *, writable: bool, snapshot: str | None = None) -> NbdExport:
        """nbdkit's ``file`` plugin on the disk's file (the lab has no snapshots: ``snapshot`` must be None)."""
        if snapshot is not None:
            raise HypervisorError("The lab has no snapshots to read a disk from.")
        return NbdExport("file", (f"file={self.disk_path(vm_id, disk_key)}",), readonly=not writable)

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
                        record = record[os.write(fd, record) :]
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
            blocks = struct.unpack(f"<{records - int(count)}I", raw[start : records * _RECORD.size])
            return ChangedAreas(current, _extents(blocks, disk["capacity_bytes"]))

    @staticmethod
    def _allocated(path: Path, capacity: int) -> tuple[tuple[int, int], ...]:
        blocks: set[int] = set()
        fd = os.open(path, os.O_RDONLY)
        try:
            for data, length in _data_extents(fd, capacity):
                blocks.update(range(data // BLOCK_SIZE, (data + length - 1) // BLOCK_SIZE + 1))
        finally:
            os.close(fd)
        return _extents(blocks, capacity)

    # -- disks without a local path (the network side of DiskAccess) ---------------
    def download_range(self, vm_id: str, disk_key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the disk file from ``offset``; holes read as zeros."""
        vm = self._vm(vm_id)
        disk = self._disk(vm, disk_key)
        capacity = disk["capacity_bytes"]
        if offset < 0 or length < 0 or offset + length > capacity:
            raise HypervisorError(
                f"Read {length} bytes at {offset} of disk {disk_key} of {vm['name']}: outside the disk ({capacity} bytes)."
            )
        with open(self._disk_file(vm, disk), "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        return data + bytes(length - len(data))

    def copy_disk_network(
        self, src_vm_id: str, dst_vm_id: str, disk_key: str, *, progress: Callable[[int], None] | None = None
    ) -> int:
        """Make the target's disk a copy of the source's (same key and size), keeping holes: the target
        is emptied, then only the source's allocated extents are written. Returns the bytes copied.
        Like writes through ``disk_path``, the copy is no guest write: change tracking does not see it.
        ``progress(copied)`` is called after each chunk, with the lab's lock held (guest writes wait)."""
        what = f"Copy disk {disk_key} from {src_vm_id} to {dst_vm_id}"
        if src_vm_id == dst_vm_id:
            raise HypervisorError(f"{what}: source and target are the same VM.")
        with self._locked():  # no guest write lands halfway through the copy
            src, dst = self._vm(src_vm_id), self._vm(dst_vm_id)
            sdisk, ddisk = self._disk(src, disk_key), self._disk(dst, disk_key)
            capacity = sdisk["capacity_bytes"]
            if capacity != ddisk["capacity_bytes"]:
                raise HypervisorError(
                    f"{what}: the disks differ in size ({capacity} and {ddisk['capacity_bytes']} bytes)."
                )
            with open(self._disk_file(src, sdisk), "rb") as s, open(self._disk_file(dst, ddisk), "r+b") as d:
                d.truncate(0)  # every block released: the target reads as zeros
                d.truncate(capacity)
                copied = 0
                for offset, length in list(_data_extents(s.fileno(), capacity)):
                    end = offset + length
                    while offset < end:
                        chunk = os.pread(s.fileno(), min(4 * MiB, end - offset), offset)
                        if not chunk:
                            break
                        d.seek(offset)
                        d.write(chunk)
                        offset += len(chunk)
                        copied += len(chunk)
                        if progress is not None:
                            progress(copied)
            return copied
