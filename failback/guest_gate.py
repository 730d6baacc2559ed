"""A plan's guest-ready gate between boot groups (issue 17, part 3).

After a member's production VM powers on, the next member in boot order waits until that guest is
ready, at most the plan's ``guest_gate_timeout_s``:

- ``guest``: the platform says so (``Hypervisor.guest_ready``: VMware Tools running with a green
  heartbeat on vSphere; tools installed and the guest's boot time passed in the lab);
- ``tcp``: a TCP connection to the plan's ``host:port`` succeeds (``{vm}`` in the host is replaced by
  the member's production VM name, e.g. ``{vm}.corp.example:443``).

Each wait is one ``guest_gate`` audit row on the member: ready after N s, or not ready in time.

**A gate not met stops the plan's switch.** The members not switched yet fail their switch with the
reason; their switch had not begun, so their replicas were never stopped and keep running the
workload. Members already switched stay in Failback. Boot order exists because a later member needs
an earlier one, so powering it on anyway is what the gate is there to prevent. A member whose own
switch failed (its production VM is not up) does not meet the gate either.
"""

import socket
import time
from contextlib import closing

from django.utils import timezone

from . import broadcast, workflow
from .audit import Refused, audit
from .choices import AuditAction, GuestGate, Outcome, SessionStatus
from .hypervisors.base import HypervisorError
from .hypervisors.registry import hypervisor_for
from .models import FailbackSession

POLL_S = 1.0  # between two looks at the guest
CONNECT_TIMEOUT_S = 2.0  # one TCP connection attempt
MAX_TIMEOUT_S = 3600


def parse_address(text):
    """``host:port`` -> (host, port); ValueError with the reason when it is not one."""
    host, sep, port = (text or "").strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port (a port from 1 to 65535)")
    return host, int(port)


def tcp_open(host, port):
    """Whether a TCP connection to host:port is accepted now."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def describe(plan, session=None):
    """The gate in words, for the audit trail and the plan's page."""
    if plan.guest_gate == GuestGate.TCP:
        address = plan.guest_gate_address
        if session is not None:
            address = address.replace("{vm}", session.vm_name)
        return f"TCP port {address}"
    return "guest ready (VMware Tools heartbeat / lab guest state)"


def waiting_on(plan, members, now=None):
    """While the plan's switch waits at the gate: whose guest, for which next member, since when (what the
    plan's page shows). Read from the members' rows: the last member up on production with no gate row yet,
    and the next one switching with its replica not stopped yet. None otherwise."""
    if not plan.guest_gate or plan.switch_started_at is None:
        return None
    switching = [s for s in members if s.switch_started_at is not None]
    for before, after in zip(switching, switching[1:], strict=False):
        if (
            after.status == SessionStatus.SWITCHING
            and after.replica_stop_started_at is None
            and before.status == SessionStatus.FAILBACK
            and before.phase2_ended_at is not None
        ):
            if before.events.filter(action=AuditAction.GUEST_GATE).exists():
                return None  # met: the power-on delay, if any, then the next member's switch
            since = before.phase2_ended_at
            waited = ((now or timezone.now()) - since).total_seconds()
            return {
                "member": before,
                "next": after,
                "since": since,
                "waited_s": max(0.0, waited),
                "timeout_s": plan.guest_gate_timeout_s,
                "gate": describe(plan, before),
                "text": f"Waiting for {before.vm_name}'s guest before {after.vm_name} switches: "
                f"{describe(plan, before)}, since {timezone.localtime(since):%H:%M:%S}, at most "
                f"{plan.guest_gate_timeout_s} s; "
                "if it is not ready by then, the rest of the plan stops and their replicas keep running",
            }
    return None


def _ready(plan, session, hv):
    if plan.guest_gate == GuestGate.TCP:
        return tcp_open(*parse_address(plan.guest_gate_address.replace("{vm}", session.vm_name)))
    return hv.guest_ready(session.production_vm_id)


def wait(plan, session_id, pending_ids):
    """Wait for member ``session_id``'s guest; True when ready. Not ready in time: the pending members'
    switch fails (their replicas keep running), the row says why, and False."""
    session = FailbackSession.objects.select_related("replica").get(pk=session_id)
    gate = describe(plan, session)
    started = time.monotonic()
    last_error = ""
    if session.status == SessionStatus.FAILBACK and session.production_vm_id and session.power_on_after:
        deadline = started + plan.guest_gate_timeout_s
        with closing(hypervisor_for(session.replica)) as hv:
            while True:
                try:
                    if _ready(plan, session, hv):
                        waited = time.monotonic() - started
                        _audit(
                            session,
                            Outcome.OK,
                            f"Plan {plan.name}: {session.vm_name} ready after {waited:.0f} s ({gate}); "
                            "the next member goes on",
                            plan,
                            waited_s=round(waited, 1),
                        )
                        return True
                except HypervisorError as exc:
                    last_error = str(exc)
                if time.monotonic() >= deadline:
                    break
                FailbackSession.objects.filter(pk__in=list(pending_ids)).update(heartbeat_at=timezone.now())
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        why = f"not ready after {plan.guest_gate_timeout_s} s ({gate})" + (f": {last_error}" if last_error else "")
    else:
        why = f"did not come up on production (failback #{session.pk} is {session.get_status_display()})"
    _stop(plan, session, why, pending_ids, time.monotonic() - started)
    return False


def _stop(plan, session, why, pending_ids, waited):
    pending = list(FailbackSession.objects.filter(pk__in=list(pending_ids)).order_by("plan_order", "pk"))
    names = ", ".join(s.vm_name for s in pending) or "none"
    _audit(
        session,
        Outcome.FAILED,
        f"Plan {plan.name}: {session.vm_name} {why}; the plan's switch stops here. Not switched: {names} "
        "(their replicas keep running)",
        plan,
        waited_s=round(waited, 1),
        not_switched=[s.pk for s in pending],
    )
    for member in pending:
        try:
            workflow.transition(
                member.pk,
                "fail_switch",
                error=f"Guest gate: {session.vm_name} {why}",
                detail=f"Not switched: plan {plan.name}'s guest-ready gate on {session.vm_name} was not met "
                f"({why}); the replica was not stopped and keeps running the workload",
                data={"plan": plan.name, "gate_member": session.pk},
            )
        except Refused:
            pass  # audited; moved on meanwhile (cancelled by a person)


def _audit(session, outcome, detail, plan, **data):
    audit(
        action=AuditAction.GUEST_GATE,
        outcome=outcome,
        session=session,
        from_state=session.status,
        to_state=session.status,
        detail=detail,
        data={
            "plan": plan.name,
            "plan_id": plan.pk,
            "gate": plan.guest_gate,
            "address": plan.guest_gate_address,
            "timeout_s": plan.guest_gate_timeout_s,
            **data,
        },
    )
    broadcast.session_changed(session.pk)
