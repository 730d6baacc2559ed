"""A plan's guest-ready gate between boot groups (issue 17, part 3): the lab's guest state, a real TCP
socket, and a gate not met stopping the rest of the plan with its replicas still running.
vSphere's heartbeat (guest_ready on vcsim) is held by tests/test_platform_contract.py."""

import socket

import pytest

from failback import guest_gate, plans
from failback.audit import Refused
from failback.choices import GuestGate, Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.models import AuditEvent

from .helpers import replica_named
from .test_plans import NAMES, members, sessions_of

pytestmark = [pytest.mark.beyond, pytest.mark.django_db(databases="__all__", transaction=True)]


def gate_rows(session):
    return list(AuditEvent.objects.filter(session_id=session.pk, action="guest_gate").order_by("pk"))


def test_it_waits_for_the_lab_guest_before_the_next_member(lab, operator):
    first = replica_named(NAMES[0])
    # The production VM, made like the replica, has tools and boots as long.
    lab.set_vm_options(first.vm_id, tools_installed=True, boot_seconds=1.5)
    plan = plans.start_plan(
        operator,
        name="gated",
        members=members(lab, NAMES[:2]),
        switch_mode=SwitchMode.AUTO,
        guest_gate=GuestGate.GUEST,
        guest_gate_timeout_s=60,
    )
    a, b = sessions_of(plan)
    (row,) = gate_rows(a)
    assert [a.status, b.status] == [SessionStatus.FAILBACK] * 2
    assert row.outcome == Outcome.OK and "ready after" in row.detail and "guest ready" in row.detail
    assert row.data["gate"] == "guest" and row.data["waited_s"] >= 1.5  # the lab's boot time, not a clock bound
    assert lab.guest_ready(a.production_vm_id) and lab.power_state(b.production_vm_id) == POWERED_ON
    assert not gate_rows(b)  # the last member gates nothing
    assert "gate before the next member" in AuditEvent.objects.get(action="start_plan").detail


def test_a_guest_without_tools_stops_the_rest_of_the_plan_with_its_replicas_running(lab, operator):
    first = replica_named(NAMES[0])
    lab.set_vm_options(first.vm_id, tools_installed=False)  # its production VM never reports a ready guest
    plan = plans.start_plan(
        operator,
        name="never ready",
        members=members(lab),
        switch_mode=SwitchMode.AUTO,
        guest_gate=GuestGate.GUEST,
        guest_gate_timeout_s=2,
    )
    a, b, c = sessions_of(plan)
    assert a.status == SessionStatus.FAILBACK and lab.power_state(a.production_vm_id) == POWERED_ON
    (row,) = gate_rows(a)
    assert row.outcome == Outcome.FAILED
    assert "not ready after 2 s" in row.detail and "stops here" in row.detail
    assert row.data["not_switched"] == [b.pk, c.pk]
    for later in (b, c):
        assert later.status == SessionStatus.FAILED and "Guest gate" in later.error
        assert later.replica.state == ReplicaState.FAILOVER
        assert lab.power_state(later.replica.vm_id) == POWERED_ON  # never stopped: it runs the workload
        assert lab.power_state(later.production_vm_id) == POWERED_OFF
        assert AuditEvent.objects.filter(session_id=later.pk, action="fail_switch", detail__contains="gate").exists()
        assert not AuditEvent.objects.filter(session_id=later.pk, action="stop_replica").exists()


def test_a_tcp_gate_waits_for_a_real_listening_port(lab, operator):
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        plan = plans.start_plan(
            operator,
            name="tcp gated",
            members=members(lab, NAMES[:2]),
            switch_mode=SwitchMode.AUTO,
            guest_gate=GuestGate.TCP,
            guest_gate_address=f"127.0.0.1:{port}",
            guest_gate_timeout_s=30,
        )
    a, b = sessions_of(plan)
    assert [a.status, b.status] == [SessionStatus.FAILBACK] * 2
    (row,) = gate_rows(a)
    assert row.outcome == Outcome.OK and f"TCP port 127.0.0.1:{port}" in row.detail


def test_a_tcp_gate_on_a_closed_port_times_out(lab, operator):
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]  # closed again: nothing listens there
    assert not guest_gate.tcp_open("127.0.0.1", port)
    plan = plans.start_plan(
        operator,
        name="tcp closed",
        members=members(lab, NAMES[:2]),
        switch_mode=SwitchMode.AUTO,
        guest_gate=GuestGate.TCP,
        guest_gate_address=f"127.0.0.1:{port}",
        guest_gate_timeout_s=1,
    )
    a, b = sessions_of(plan)
    assert (a.status, b.status) == (SessionStatus.FAILBACK, SessionStatus.FAILED)
    assert gate_rows(a)[0].outcome == Outcome.FAILED


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guest_gate": "ping"}, "Unknown guest-ready gate"),
        ({"guest_gate": "tcp", "guest_gate_address": "db-01"}, "is not host:port"),
        ({"guest_gate": "tcp", "guest_gate_address": "db-01:70000"}, "is not host:port"),
        ({"guest_gate": "guest", "guest_gate_timeout_s": 0}, "timeout must be between"),
        ({"guest_gate": "guest", "power_on_after": False}, "needs the production VMs powered on"),
    ],
)
def test_it_refuses_a_bad_gate(lab, operator, kwargs, message):
    with pytest.raises(Refused, match=message):
        plans.start_plan(operator, name="bad gate", members=members(lab, NAMES[:1]), **kwargs)
    assert AuditEvent.objects.filter(action="start_plan", outcome=Outcome.REFUSED, detail__contains=message).exists()


def test_the_gate_address_names_each_member():
    assert guest_gate.parse_address("{vm}.corp.example:443") == ("{vm}.corp.example", 443)
    assert guest_gate.parse_address("[::1]:22") == ("::1", 22)
