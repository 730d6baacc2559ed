"""A VM's disks side by side in the switch and in a catch-up sync (FAILBACK_DISK_THREADS, jobs/disks.py).

A lab VM of four disks, each with its own data and its own change: byte-identical disks after the switch,
one send_changes row per disk, the disks' recorded spans overlapping (never more at once than the
setting), and one disk that cannot be written failing the whole switch with the replica serving again.
"""

import filecmp
import random
import threading

import pytest
from django.core.management import call_command
from django.db import connection

from failback import jobs, workflow
from failback.choices import Outcome, SessionStatus
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.jobs import Run
from failback.models import AuditEvent

from .conftest import wait_for
from .helpers import replica_named, start
from .test_faults import assert_replica_serving, fill, session_of, sha256, small_datastore

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

MiB = 1 << 20
DISKS = 4


def four_disk_replica(lab, name, *, size=24 * MiB, data=12 * MiB, cbt=True):
    """A running replica of four disks, each holding ``data`` bytes of its own random data."""
    vm_id = lab.create_vm(
        f"{name}_replica",
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=[size] * DISKS,
        networks=["dr-net"],
        power_on=True,
        tools_installed=False,
        cbt=cbt,
    )
    for i in range(DISKS):
        with open(lab.disk_path(vm_id, f"scsi0:{i}"), "r+b") as disk:
            disk.write(random.Random(i).randbytes(data))
    call_command("seed_lab", "--no-user", stdout=open("/dev/null", "w"))
    return replica_named(name)


def change_every_disk(lab, replica, nbytes, seed=1):
    rng = random.Random(seed)
    for i in range(DISKS):
        lab.guest_write(replica.vm_id, f"scsi0:{i}", 2 * MiB + i * 4096, rng.randbytes(nbytes))


def most_at_once(spans):
    """The largest number of spans (start, end) that were running at the same moment."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def assert_identical(lab, session):
    for disk in session.disks.all():
        src, dst = lab.disk_path(session.replica.vm_id, disk.key), lab.disk_path(session.production_vm_id, disk.key)
        assert filecmp.cmp(src, dst, shallow=False), f"disk {disk.key} differs"
        assert disk.verified and disk.source_digest == disk.target_digest != ""


@pytest.mark.parametrize("cbt", [True, False], ids=["tracked", "digest"])
def test_it_sends_the_disks_of_one_vm_side_by_side(lab, operator, settings, cbt):
    settings.FAILBACK_DISK_THREADS = 2
    replica = four_disk_replica(lab, f"quad-{'t' if cbt else 'd'}", cbt=cbt)
    session = session_of(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    change_every_disk(lab, replica, 3 * MiB)
    workflow.switch_now(operator, session.pk)
    session = session_of(session)

    assert session.status == SessionStatus.FAILBACK, session.error
    assert lab.power_state(replica.vm_id) == POWERED_OFF and lab.power_state(session.production_vm_id) == POWERED_ON
    assert_identical(lab, session)
    rows = list(AuditEvent.objects.filter(session=session, action="send_changes"))
    assert sorted(r.data["disk"] for r in rows) == [f"scsi0:{i}" for i in range(DISKS)]  # one row per disk
    assert all(r.outcome == Outcome.OK and r.data["method"] == ("tracked" if cbt else "digest") for r in rows)
    assert all(r.data["bytes_written"] >= 3 * MiB for r in rows)
    spans = [(r.data["started_at"], r.data["ended_at"]) for r in rows]
    assert all(s < e for s, e in spans)
    assert most_at_once(spans) == 2, spans  # they overlapped, and never more than the setting allows
    assert session.disks.filter(phase=2, bytes_done__gt=0).count() == DISKS


def test_it_keeps_one_disk_at_a_time_when_told_to(lab, operator, settings):
    settings.FAILBACK_DISK_THREADS = 1
    replica = four_disk_replica(lab, "quad-one")
    session = session_of(start(operator, replica))
    change_every_disk(lab, replica, MiB)
    workflow.switch_now(operator, session.pk)
    session = session_of(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert_identical(lab, session)
    rows = AuditEvent.objects.filter(session=session, action="send_changes")
    assert most_at_once([(r.data["started_at"], r.data["ended_at"]) for r in rows]) == 1


def test_it_catches_up_every_disk_side_by_side(lab, operator, settings):
    settings.FAILBACK_DISK_THREADS = 3
    replica = four_disk_replica(lab, "quad-catch")
    session = session_of(start(operator, replica))
    change_every_disk(lab, replica, 2 * MiB, seed=2)
    written = jobs.run_readiness(session.pk, catch_up=True)
    assert written is not None  # the prediction came back: the catch-up ran
    row = AuditEvent.objects.get(session=session, action="catch_up")
    assert sorted(row.data["bytes_written"]) == [f"scsi0:{i}" for i in range(DISKS)]
    assert all(n >= 2 * MiB for n in row.data["bytes_written"].values())
    assert row.detail.index("scsi0:0") < row.detail.index("scsi0:3")  # disk order, whatever order they finished in
    lab.power_off(replica.vm_id)  # nothing writes any more: the production disks now hold the replica's bytes
    for i in range(DISKS):
        key = f"scsi0:{i}"
        assert filecmp.cmp(
            lab.disk_path(replica.vm_id, key), lab.disk_path(session.production_vm_id, key), shallow=False
        )
    session = session_of(session)
    assert session.status == SessionStatus.READY_TO_SWITCH
    assert all(d.change_id for d in session.disks.all())  # tracking goes on from the catch-up's change ids


@pytest.mark.faults
def test_it_fails_the_whole_switch_when_one_disk_cannot_be_written_and_brings_the_replica_back(lab, operator, settings):
    settings.FAILBACK_DISK_THREADS = 2
    replica = four_disk_replica(lab, "quad-full", size=16 * MiB, data=4 * MiB)
    with small_datastore(lab, "prod-ds-01", 40 * MiB) as datastore:
        session = session_of(start(operator, replica))
        assert session.status == SessionStatus.READY_TO_SWITCH, session.error
        change_every_disk(lab, replica, 64 * 1024)  # small changes on every disk
        lab.guest_write(replica.vm_id, "scsi0:2", 8 * MiB, random.Random(9).randbytes(6 * MiB))  # and one big one
        before = {i: sha256(lab.disk_path(replica.vm_id, f"scsi0:{i}")) for i in range(DISKS)}
        fill(datastore, leave=MiB)  # room for the small changes, not for disk 2's
        workflow.switch_now(operator, session.pk)
        session = session_of(session)
        # the production VM stays, powered off; a new start with its name says whose it is
        assert lab.power_state(session.production_vm_id) == POWERED_OFF
        with pytest.raises(workflow.Refused) as refused:
            start(operator, replica)
        assert str(refused.value) == (
            f"A VM named '{session.vm_name}' already exists (the production VM of failback #{session.pk}, "
            "which is Failed); pick another name."
        )
    assert_replica_serving(lab, session)
    assert {i: sha256(lab.disk_path(replica.vm_id, f"scsi0:{i}")) for i in range(DISKS)} == before
    assert "No space left on datastore prod-ds-01" in session.error
    failed = AuditEvent.objects.get(session=session, action="fail_switch")
    assert "replica powered on" in failed.data["recovery"]
    rows = AuditEvent.objects.filter(session=session, action="send_changes")
    assert "scsi0:2" not in {r.data["disk"] for r in rows}  # the disk that failed claims nothing
    assert len({r.data["disk"] for r in rows}) == rows.count()  # and no disk is reported twice
    assert not session.disks.get(key="scsi0:2").verified


def test_it_stops_every_disk_without_writing_when_another_run_takes_the_switch_over(lab, operator, settings):
    """The watchdog handed the switch to another run while the disks were going: the first run stops at
    its next lease check, writes no further row, and the run that took over finishes the switch."""
    settings.FAILBACK_DISK_THREADS = 1  # one disk after another: the takeover lands while some are left
    replica = four_disk_replica(lab, "quad-lease", size=96 * MiB, data=64 * MiB, cbt=False)  # digest: reads all
    session = session_of(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    change_every_disk(lab, replica, MiB)

    def switch():
        try:
            workflow.switch_now(operator, session.pk)  # inline: the whole switch, in this thread
        finally:
            connection.close()

    first = threading.Thread(target=switch)
    first.start()
    rows = AuditEvent.objects.filter(session=session, action="send_changes")
    wait_for(rows.exists, timeout=60, interval=0.005, what="the first disk sent")
    taken = Run.take(session.pk, SessionStatus.SWITCHING)  # what the watchdog's new run does first
    assert taken is not None
    at_takeover = rows.count()
    first.join(60)
    assert not first.is_alive()
    assert at_takeover < DISKS, "every disk was through before the takeover: nothing left to fence"
    assert rows.count() == at_takeover  # nothing written after the lease moved on
    assert not AuditEvent.objects.filter(session=session, action__in=["finish_switch", "fail_switch"]).exists()
    assert session_of(session).status == SessionStatus.SWITCHING

    jobs.run_switch(session.pk)  # the run that took over (the watchdog queues it)
    session = session_of(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert_identical(lab, session)
    assert AuditEvent.objects.filter(session=session, action="finish_switch").count() == 1
