"""A whole failback run by a real django-q2 cluster process, as in production."""

import filecmp

import pytest
from django_q.conf import Conf

from failback import workflow
from failback.choices import ReplicaState, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession

from .conftest import wait_for
from .helpers import replica_named, start

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.process]


def status_is(session, *statuses):
    return lambda: FailbackSession.objects.get(pk=session.pk).status in statuses


def test_it_runs_phase1_switch_and_commit_in_a_real_worker(lab, operator, qcluster, monkeypatch):
    monkeypatch.setattr(Conf, "SYNC", False)  # tasks go to the broker; the qcluster process runs them
    replica = replica_named("app-erp")
    lab.set_vm_options(replica.vm_id, shutdown_seconds=0.5)
    session = start(operator, replica, switch_mode=SwitchMode.MANUAL)
    wait_for(status_is(session, SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED), timeout=90, what="phase 1 in the worker")
    disk = session.disks.first()
    lab.guest_write(replica.vm_id, disk.key, 0, b"after phase 1" * 1000)  # users kept working
    workflow.switch_now(operator, session.pk)
    wait_for(status_is(session, SessionStatus.FAILBACK, SessionStatus.FAILED), timeout=90, what="the switch in the worker")
    workflow.commit(operator, session.pk)
    wait_for(status_is(session, SessionStatus.COMMITTED, SessionStatus.FAILED), timeout=90, what="commit in the worker")
    session = FailbackSession.objects.select_related("replica").get(pk=session.pk)
    assert session.status == SessionStatus.COMMITTED, session.error
    assert session.replica.state == ReplicaState.READY
    for d in session.disks.all():
        assert filecmp.cmp(lab.disk_path(replica.vm_id, d.key), lab.disk_path(session.production_vm_id, d.key), shallow=False)
        assert d.verified
    assert AuditEvent.objects.filter(session=session, action="send_changes").count() == session.disks.count()
