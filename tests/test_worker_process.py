"""A whole failback run by a real django-q2 cluster process, as in production."""

import filecmp
import os
import random
import time

import pytest
from django.core.management import call_command
from django_q.conf import Conf

from failback import watchdog, workflow
from failback.choices import ReplicaState, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession, SessionDisk

from .conftest import kill_cluster, start_cluster, wait_for
from .helpers import replica_named, start

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.process]


def status_is(session, *statuses):
    return lambda: FailbackSession.objects.get(pk=session.pk).status in statuses


def test_it_runs_phase1_switch_and_commit_in_a_real_worker(lab, operator, qcluster, monkeypatch):
    monkeypatch.setattr(Conf, "SYNC", False)  # tasks go to the broker; the qcluster process runs them
    replica = replica_named("app-erp")
    lab.set_vm_options(replica.vm_id, shutdown_seconds=0.5)
    session = start(operator, replica, switch_mode=SwitchMode.MANUAL)
    wait_for(
        status_is(session, SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED),
        timeout=90,
        what="phase 1 in the worker",
    )
    disk = session.disks.first()
    lab.guest_write(replica.vm_id, disk.key, 0, b"after phase 1" * 1000)  # users kept working
    workflow.switch_now(operator, session.pk)
    wait_for(
        status_is(session, SessionStatus.FAILBACK, SessionStatus.FAILED), timeout=90, what="the switch in the worker"
    )
    # The switch's step powers production on right after it reaches Failback; Commit is offered (and taken) only
    # then, as the session page shows it.
    wait_for(
        lambda: FailbackSession.objects.filter(pk=session.pk, production_on_at__isnull=False).exists()
        or FailbackSession.objects.get(pk=session.pk).status != SessionStatus.FAILBACK,
        timeout=90,
        what="production powered on by the worker",
    )
    workflow.commit(operator, session.pk)
    wait_for(status_is(session, SessionStatus.COMMITTED, SessionStatus.FAILED), timeout=90, what="commit in the worker")
    session = FailbackSession.objects.select_related("replica").get(pk=session.pk)
    assert session.status == SessionStatus.COMMITTED, session.error
    assert session.replica.state == ReplicaState.READY
    for d in session.disks.all():
        assert filecmp.cmp(
            lab.disk_path(replica.vm_id, d.key), lab.disk_path(session.production_vm_id, d.key), shallow=False
        )
        assert d.verified
    assert AuditEvent.objects.filter(session=session, action="send_changes").count() == session.disks.count()


@pytest.mark.faults
def test_it_resumes_phase1_from_its_checkpoint_after_the_worker_is_killed(lab, operator, settings, monkeypatch):
    monkeypatch.setattr(Conf, "SYNC", False)
    settings.FAILBACK_STALL_SECONDS = 2
    vm_id = lab.create_vm(
        "big-01_replica",
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=[64 * 2**20],
        networks=["dr-net"],
        tools_installed=False,
        power_on=True,
    )
    with open(lab.disk_path(vm_id, "scsi0:0"), "r+b") as disk:
        disk.write(random.Random(5).randbytes(48 * 2**20))
    call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))  # imports the new replica
    replica = replica_named("big-01")
    first = start_cluster(settings)
    try:
        session = start(operator, replica, bandwidth_mbps=8)  # about 6 s of copying
        wait_for(
            lambda: SessionDisk.objects.filter(session=session, bytes_done__gt=24 * 2**20).exists(),
            timeout=60,
            what="half of phase 1",
        )
    finally:
        kill_cluster(first)
    time.sleep(3)  # no heartbeat any more
    assert watchdog.recover_stalled() == [session.pk]
    assert watchdog.recover_stalled() == []  # claimed once
    second = start_cluster(settings)
    try:
        wait_for(
            status_is(session, SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED),
            timeout=90,
            what="the resumed phase 1",
        )
        copy = AuditEvent.objects.get(session=session, action="copy_disk")
        assert copy.data["resumed_from"] > 0  # it went on from the checkpoint, not from zero
        assert AuditEvent.objects.filter(session=session, action="resume").count() == 1
        workflow.switch_now(operator, session.pk)
        wait_for(status_is(session, SessionStatus.FAILBACK, SessionStatus.FAILED), timeout=90, what="the switch")
    finally:
        kill_cluster(second)
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert filecmp.cmp(
        lab.disk_path(vm_id, "scsi0:0"), lab.disk_path(session.production_vm_id, "scsi0:0"), shallow=False
    )
