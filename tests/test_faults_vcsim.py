"""vCenter misbehaving during a failback: answering 503, losing answers, going away, or too slow.

The portal talks to VMware's simulator through ``FaultProxy`` (tests/vcsim_support.py), a real TLS
proxy on loopback that the portal's connection pins, as it would pin a load balancer in front of
vCenter. The proxy breaks the network on demand and counts what reached it, so the tests can check
that retries are bounded, that the error shown says what happened, and that the session, the replica
and the audit trail agree with what really happened on the simulator.
"""

import random

import pytest

from failback import connections, watchdog, workflow
from failback.choices import Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_ON
from failback.models import AuditEvent, Replica, VCenterConnection

from .conftest import wait_for
from .test_vsphere_failback import assert_identical, reload, scribble, start
from .test_vsphere_vcsim import resize_disk
from .vcsim_support import fault_proxy  # noqa: F401

pytestmark = [pytest.mark.vcsim, pytest.mark.faults, pytest.mark.django_db(databases="__all__", transaction=True)]

MiB = 1 << 20
READ = "RetrievePropertiesEx"


@pytest.fixture
def vsphere_settings(settings):
    """Short vCenter timeouts so that a hung call fails in seconds; the default number of retries (3)."""
    settings.FAILBACK_VSPHERE_TIMEOUT = 2
    settings.FAILBACK_VSPHERE_RETRIES = 3
    return settings


@pytest.fixture
def replica(vcsim, fault_proxy, admin_user, operator, vsphere_settings):
    """A running replica with data, discovered through the proxy (the portal only ever sees the proxy)."""
    hv = vcsim.hypervisor()
    source = next(vm for vm in hv.inventory().vms if vm.name == "DC0_H0_VM0")
    vm_id = hv.create_vm_like(
        source.vm_id,
        name="web-01_replica",
        host="DC0_H0",
        datastore="LocalDS_0",
        network_map={"DC0_DVPG0": "DC0_DVPG0"},
    )
    resize_disk(hv, vm_id, "scsi0:0", 32 * MiB)
    scribble(hv.disk_path(vm_id, "scsi0:0"), 4, random.Random(1))
    hv.power_on(vm_id)
    hv.close()
    conn = VCenterConnection(
        name="vcenter-via-proxy",
        host=fault_proxy.host,
        port=fault_proxy.port,
        username=vcsim.user,
        tls_mode=VCenterConnection.TLS.THUMBPRINT,
        thumbprint=fault_proxy.thumbprint,
    )
    conn = connections.save_connection(admin_user, conn, password=vcsim.password)
    assert connections.sync_inventory(conn.pk) == 1
    replica = Replica.objects.get(name="web-01_replica")
    return workflow.declare_failover(operator, replica.pk, reason="site A lost")


def power_of(vcsim, vm_id):
    hv = vcsim.hypervisor()
    try:
        return hv.power_state(vm_id)
    finally:
        hv.close()


def vm_names(vcsim):
    hv = vcsim.hypervisor()
    try:
        return {vm.name for vm in hv.inventory().vms}
    finally:
        hv.close()


def ready_to_switch(operator, replica):
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    return session


def assert_replica_serving(vcsim, session):
    """The outcome every failed switch must leave: session Failed, replica in Failover and really running."""
    session = reload(session)
    assert session.status == SessionStatus.FAILED
    assert session.replica.state == ReplicaState.FAILOVER
    assert power_of(vcsim, session.replica.vm_id) == POWERED_ON
    return session


def test_it_retries_reads_answered_503_and_finishes_the_failback(vcsim, fault_proxy, replica, operator):
    fault_proxy.requests.clear()
    fault_proxy.fail(3, READ)  # three reads in a row answered 503 by the proxy: within the 3 retries of one call
    session = reload(start(operator, replica, switch_mode=SwitchMode.AUTO))
    assert session.status == SessionStatus.FAILBACK, session.error
    assert fault_proxy.count(READ, "answered 503") == 3
    assert_identical(vcsim, session)
    assert not AuditEvent.objects.filter(session=session, outcome=Outcome.FAILED).exists()


def test_it_gives_up_after_bounded_retries_and_resumes_the_switch_when_vcenter_is_back(
    vcsim, fault_proxy, replica, operator, settings
):
    settings.FAILBACK_STALL_SECONDS = 2
    session = ready_to_switch(operator, replica)
    fault_proxy.requests.clear()
    fault_proxy.fail(1000, READ, after="PowerOffVM_Task")  # the replica goes off, then every read is answered 503
    workflow.switch_now(operator, session.pk)
    # Power-off's task poll, the production VM's check, the replica's check: each 1 + 3 retries, then given up.
    assert fault_proxy.count(READ, "answered 503") == 3 * (1 + 3)
    session = reload(session)
    assert session.status == SessionStatus.SWITCHING  # not ended with both VMs off: left open for the watchdog
    note = AuditEvent.objects.get(session=session, action="recover_replica")
    assert note.outcome == Outcome.FAILED
    assert note.detail.startswith(
        f"Switch failed: Power off {replica.vm_id}: vCenter {fault_proxy.host}:{fault_proxy.port} "
        "answered 503 Service Unavailable (after 4 attempts). The replica web-01_replica could not be powered back on"
    )
    assert "the watchdog tries again" in note.detail
    fault_proxy.clear()  # vCenter answers again
    wait_for(lambda: watchdog.recover_stalled() == [session.pk], timeout=10, what="the watchdog")
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error  # the resumed switch finished
    assert power_of(vcsim, replica.vm_id) != POWERED_ON and power_of(vcsim, session.production_vm_id) == POWERED_ON
    assert_identical(vcsim, session)
    steps = list(AuditEvent.objects.filter(session=session).order_by("pk").values_list("action", flat=True))
    assert steps.index("recover_replica") < steps.index("resume") < steps.index("finish_switch")


def test_it_brings_the_replica_back_when_the_answer_to_its_power_off_is_lost(vcsim, fault_proxy, replica, operator):
    session = ready_to_switch(operator, replica)
    fault_proxy.cut("PowerOffVM_Task")  # vCenter powers the replica off, but the answer never arrives
    workflow.switch_now(operator, session.pk)
    assert (
        fault_proxy.count("PowerOffVM_Task", "cut") == 1 and fault_proxy.count("PowerOffVM_Task") == 1
    )  # not sent twice
    session = assert_replica_serving(vcsim, session)
    assert "lost the connection to vCenter" in session.error
    failed = AuditEvent.objects.get(session=session, action="fail_switch")
    assert "replica powered on" in failed.data["recovery"]  # it had gone down: the audit says it was brought back


def test_it_rides_out_a_short_vcenter_outage_during_the_switch(vcsim, fault_proxy, replica, operator):
    session = ready_to_switch(operator, replica)
    fault_proxy.requests.clear()
    fault_proxy.outage(
        0.5, after="PowerOffVM_Task"
    )  # connections refused for 0.5 s; the retries wait 0.2 + 0.4 + 0.8 s
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert_identical(vcsim, session)
    assert not AuditEvent.objects.filter(session=session, outcome=Outcome.FAILED).exists()


def test_it_fails_clearly_when_vcenter_answers_too_slowly(vcsim, fault_proxy, replica, operator, vsphere_settings):
    session = ready_to_switch(operator, replica)
    vsphere_settings.FAILBACK_VSPHERE_RETRIES = 1
    fault_proxy.requests.clear()
    fault_proxy.delay(3, "PowerOffVM_Task")  # answered after 3 s; the portal waits 2 s and does not send it twice
    workflow.switch_now(operator, session.pk)
    session = assert_replica_serving(vcsim, session)
    assert fault_proxy.count("PowerOffVM_Task") == 1
    assert session.error == (
        f"HypervisorError: Power off {replica.vm_id}: vCenter {fault_proxy.host}:{fault_proxy.port} "
        "did not answer within 2 s"
    )
    failed = AuditEvent.objects.get(session=session, action="fail_switch")
    assert "replica powered on" in failed.data["recovery"]  # the power-off did happen, late: undone


def test_it_refuses_start_and_switch_now_clearly_while_vcenter_is_unreachable(vcsim, fault_proxy, replica, operator):
    session = ready_to_switch(operator, replica)
    fault_proxy.down()
    unreachable = (
        f"cannot connect to vCenter {fault_proxy.host}:{fault_proxy.port}: connection refused (after 4 attempts)"
    )
    with pytest.raises(workflow.Refused) as refused:
        workflow.switch_now(operator, session.pk)
    assert refused.value.message.startswith("Switch now refused by the pre-failback checks: Platform reachable: ")
    assert unreachable in refused.value.message
    session = reload(session)
    assert session.status == SessionStatus.READY_TO_SWITCH and session.replica.state == ReplicaState.READY_TO_SWITCH
    assert AuditEvent.objects.get(session=session, action="switch").outcome == Outcome.REFUSED
    other = Replica.objects.get(name="web-01_replica")
    with pytest.raises(workflow.Refused) as refused:
        start(operator, other, vm_name="web-01b")
    assert refused.value.message.startswith("Start failback refused: ") and unreachable in refused.value.message
    assert AuditEvent.objects.filter(action="start_failback", outcome=Outcome.REFUSED).count() == 1
    fault_proxy.up()
    assert power_of(vcsim, replica.vm_id) == POWERED_ON


def test_it_discards_a_production_vm_created_although_the_answer_was_lost(vcsim, fault_proxy, replica, operator):
    fault_proxy.cut("CreateVM_Task")  # vCenter creates the VM; the portal never hears of it
    session = reload(start(operator, replica))
    assert session.status == SessionStatus.FAILED and session.replica.state == ReplicaState.FAILOVER
    assert "lost the connection to vCenter" in session.error
    assert power_of(vcsim, replica.vm_id) == POWERED_ON
    assert "web-01" not in vm_names(vcsim)  # nothing half-done is left behind ...
    discarded = AuditEvent.objects.get(session=session, action="delete_production_vm")
    assert discarded.outcome == Outcome.OK and "web-01" in discarded.detail  # ... and what was cleaned up is on record
    again = reload(start(operator, replica))  # the same name is free for the next attempt
    assert again.status == SessionStatus.READY_TO_SWITCH, again.error
