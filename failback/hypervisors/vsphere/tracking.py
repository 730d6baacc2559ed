"""Change tracking: the disk's ``changeId`` and QueryChangedDiskAreas on a temporary snapshot.

``change_tracking()`` returns the disk's ``changeId`` only when the VM has ``changeTrackingEnabled``
and the platform answers QueryChangedDiskAreas; otherwise None, and the caller falls back to digest
comparison. ``changed_areas()`` raises HypervisorError when vSphere refuses the change id (after a
change tracking reset it answers InvalidArgument "A specified parameter was not correct: changeId");
the callers then compare digests too. govmomi 0.24's vcsim lacks the method; the tests run against
the project's addition to it (tests/vcsim/cbt.go).
"""

from __future__ import annotations

import contextlib
from typing import Any

from pyVmomi import vim

from ..base import ChangedAreas, HypervisorError
from .inventory import _disk_capacity


def _merge(extents: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for start, length in sorted(e for e in extents if e[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return tuple((a, n) for a, n in out)


class ChangeTracking:
    """The change-tracking part of ``VSphereHypervisor`` (it keeps ``_cbt_supported`` and ``_cbt_refusal``)."""

    _cbt_supported: bool | None
    _cbt_refusal: str

    def _cbt_available(self, vm_id: str, disk: Any) -> bool:
        """Whether the platform answers QueryChangedDiskAreas, probed once per connection: a fault
        saying the method does not exist (vcsim: MethodNotFound) means no; any other answer, yes."""
        if self._cbt_supported is None:
            try:
                self._call(
                    f"Probe QueryChangedDiskAreas on {vm_id}",
                    lambda: self._vm_ref(vm_id).QueryChangedDiskAreas(
                        snapshot=None, deviceKey=disk.key, startOffset=0, changeId="*"
                    ),
                )
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
        task = self._call(
            what,
            lambda: vm.CreateSnapshot_Task(
                name="failback-cbt",
                description="Temporary: changed block query for failback",
                memory=False,
                quiesce=False,
            ),
            idempotent=False,
        )
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
        task = self._call(
            what, lambda: snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True), idempotent=False
        )
        self._wait(task, what)

    def _query_changes(self, vm: Any, snapshot: Any, disk: Any, since_change_id: str, what: str) -> ChangedAreas:
        snap = self._call(what, lambda: self._collect([snapshot], {vim.vm.Snapshot: ["config.hardware.device"]}))
        snap_disk = next(
            (
                d
                for d in (snap[0].get("config.hardware.device") if snap else ()) or ()
                if isinstance(d, vim.vm.device.VirtualDisk) and d.key == disk.key
            ),
            None,
        )
        new_id = getattr(getattr(snap_disk, "backing", None), "changeId", None)
        if not new_id:
            raise HypervisorError(f"{what}: the snapshot has no change id for the disk.")
        capacity, offset, extents = _disk_capacity(disk), 0, []
        while offset < capacity:
            info = self._call(
                what,
                lambda start=offset: vm.QueryChangedDiskAreas(
                    snapshot=snapshot, deviceKey=disk.key, startOffset=start, changeId=since_change_id
                ),
            )
            extents += [(int(e.start), int(e.length)) for e in info.changedArea or ()]
            end = int(info.startOffset) + int(info.length)
            if end <= offset:
                break
            offset = end
        return ChangedAreas(change_id=new_id, extents=_merge(extents))
