"""Power, ownership and deletion of VMs: one task each, waited for, with vSphere's message on failure."""

from __future__ import annotations

from pyVmomi import vim

from ..base import POWERED_OFF, HypervisorError
from .client import _STATE_LABEL
from .provisioning import _owner_of


class Lifecycle:
    """The power and deletion part of ``VSphereHypervisor``."""

    def delete_vm(self, vm_id: str) -> None:
        """Destroy_Task (unregister and delete the files); refused unless the VM is powered off."""
        what = f"Delete {vm_id}"
        o = self._vm_props(vm_id, ["name", "runtime.powerState"], what)
        state = o.get("runtime.powerState")
        if state != POWERED_OFF:
            raise HypervisorError(
                f"Delete {o.get('name')} ({vm_id}): The attempted operation cannot be performed "
                f"in the current state ({_STATE_LABEL.get(state, state)})."
            )
        task = self._call(what, lambda: self._vm_ref(vm_id).Destroy_Task(), idempotent=False)
        self._wait(task, f"Delete {o.get('name')} ({vm_id})")

    def vm_owner(self, vm_id: str) -> str | None:
        o = self._vm_props(vm_id, ["config.extraConfig"], f"Read the owner of {vm_id}")
        return _owner_of(o.get("config.extraConfig"))

    def find_owned_vm(self, owner_tag: str) -> str | None:
        if not owner_tag:
            return None
        world = self._call(
            f"Find the VM owned by {owner_tag}", lambda: self._collect_all({vim.VirtualMachine: ["config.extraConfig"]})
        )
        return next(
            (o.ref._moId for o in world[vim.VirtualMachine] if _owner_of(o.get("config.extraConfig")) == owner_tag),
            None,
        )

    def power_state(self, vm_id: str) -> str:
        return self._vm_props(vm_id, ["runtime.powerState"], f"Read the power state of {vm_id}").get(
            "runtime.powerState"
        )

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

    def guest_ready(self, vm_id: str) -> bool:
        """Powered on, VMware Tools running and the guest heartbeat green."""
        o = self._vm_props(
            vm_id,
            ["runtime.powerState", "guest.toolsRunningStatus", "guestHeartbeatStatus"],
            f"Read the guest heartbeat of {vm_id}",
        )
        return (
            o.get("runtime.powerState") == "poweredOn"
            and o.get("guest.toolsRunningStatus") == "guestToolsRunning"
            and o.get("guestHeartbeatStatus") == "green"
        )

    def shutdown_guest(self, vm_id: str) -> None:
        """ShutdownGuest: ask the guest OS to shut down; returns at once (poll power_state).
        vSphere refuses it without running tools (ToolsUnavailable) or when not powered on."""
        what = f"Shut down the guest of {vm_id}"
        self._call(what, lambda: self._vm_ref(vm_id).ShutdownGuest(), idempotent=False)
