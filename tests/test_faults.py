"""Breaking things on purpose: workers killed mid-step, guests that hang, full datastores, a scheduler
that was down, the web server killed under its websockets, and operators racing each other.

Real processes throughout: qcluster clusters in their own process groups (killed with SIGKILL), a
tmpfs mounted over a lab datastore (the kernel says "no space left"), Daphne killed and restarted.
The watchdog is ``watchdog.recover_stalled``, the function the ``failback-watchdog`` schedule runs.
"""

import contextlib
import filecmp
import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from django_q.conf import Conf
from django_q.models import Schedule, Task

from failback import automatic, schedules, watchdog, workflow
from failback.choices import Outcome, ReplicaState, SessionStatus
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.models import AuditEvent, FailbackSession, SessionDisk

from .browser_support import portal  # noqa: F401
from .conftest import kill_cluster, start_cluster, wait_for
from .helpers import replica_named, start
from .test_concurrency import race, split

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.faults]

MiB = 1 << 20
STALL = 2  # FAILBACK_STALL_SECONDS for these tests: a worker silent this long is replaced


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def clusters(settings, tmp_path, monkeypatch):
    """Start clusters with ``clusters.start()``; all are killed after the test. Tasks go to the broker."""
    monkeypatch.setattr(Conf, "SYNC", False)
    settings.FAILBACK_STALL_SECONDS = STALL
    started = []

    class Clusters:
        log = tmp_path / "qcluster.log"

        def start(self, **env):
            started.append(start_cluster(settings, self.log, **env))
            return started[-1]

    yield Clusters()
    for proc in started:
        kill_cluster(proc)
    if Clusters.log.exists():
        print(Clusters.log.read_text(errors="replace")[-4000:])


def session_of(session):
    return FailbackSession.objects.select_related("replica").get(pk=session.pk)


def reaches(session, *statuses, timeout=90):
    wait_for(
        lambda: FailbackSession.objects.get(pk=session.pk).status in statuses,
        timeout=timeout,
        what=f"status {statuses}",
    )
    return session_of(session)


def resume_after_stall(session):
    """The watchdog's run once the killed worker has been silent for longer than STALL."""
    time.sleep(STALL + 0.5)
    assert watchdog.recover_stalled() == [session.pk]


def make_replica(lab, name, *, size=64 * MiB, data=48 * MiB, seed=5, **options):
    """A running replica holding ``data`` bytes of random data, imported into the portal."""
    vm_id = lab.create_vm(
        f"{name}_replica",
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=[size],
        networks=["dr-net"],
        power_on=True,
        **options,
    )
    rng = random.Random(seed)
    with open(lab.disk_path(vm_id, "scsi0:0"), "r+b") as disk:
        for offset in range(0, data, 16 * MiB):
            disk.write(rng.randbytes(min(16 * MiB, data - offset)))
    call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))
    return replica_named(name)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def assert_identical(lab, session):
    for disk in session.disks.all():
        assert filecmp.cmp(
            lab.disk_path(session.replica.vm_id, disk.key),
            lab.disk_path(session.production_vm_id, disk.key),
            shallow=False,
        )


def assert_switched(lab, session):
    """The switch finished: production runs with the replica's bytes, the replica is off and in Failback."""
    assert session.status == SessionStatus.FAILBACK, session.error
    assert session.replica.state == ReplicaState.FAILBACK
    # The step reaches Failback first and powers production on right after: a poll can fall in between.
    wait_for(lambda: lab.power_state(session.production_vm_id) == POWERED_ON, timeout=30, what="production powered on")
    assert lab.power_state(session.replica.vm_id) == POWERED_OFF
    assert_identical(lab, session)
    assert all(d.verified for d in session.disks.all())


def assert_replica_serving(lab, session):
    """A failed attempt's only acceptable outcome: session Failed, replica in Failover and running."""
    assert session.status == SessionStatus.FAILED
    assert session.replica.state == ReplicaState.FAILOVER
    assert lab.power_state(session.replica.vm_id) == POWERED_ON


@contextlib.contextmanager
def small_datastore(lab, name, size):
    """Mount a tmpfs of ``size`` bytes over a lab datastore's directory: the kernel enforces the limit."""
    path = lab.root / "datastores" / name
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small filesystem at {path} (needs root, as CI runs): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path, leave=0):
    """Another writer takes the datastore's free space (as a growing VM on the same datastore would),
    a MiB at a time until ``leave`` bytes are left or the kernel says the filesystem is full."""
    with open(path / "other-vm-flat.vmdk", "wb") as f:
        size = 0
        while shutil.disk_usage(path).free > leave + MiB:
            try:
                os.posix_fallocate(f.fileno(), size, MiB)
            except OSError:
                break
            size += MiB
    assert shutil.disk_usage(path).free <= leave + MiB


# -- worker killed -----------------------------------------------------------------------------


@pytest.mark.process
def test_it_resumes_phase1_on_the_next_worker_losing_at_most_one_checkpoint_interval(lab, operator, clusters):
    replica = make_replica(lab, "big-01", tools_installed=False)
    worker = clusters.start()
    session = start(operator, replica, bandwidth_mbps=8)  # 8 MB/s: about 6 s of copying
    wait_for(
        lambda: SessionDisk.objects.filter(session=session, bytes_done__gt=20 * MiB).exists(),
        timeout=60,
        what="phase 1 under way",
    )
    kill_cluster(worker)
    at_kill = SessionDisk.objects.get(session=session).bytes_done
    lab.guest_write(replica.vm_id, "scsi0:0", 2 * MiB, b"written while no worker ran" * 4096)  # users keep working
    resume_after_stall(session)
    clusters.start()
    session = reaches(session, SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED)
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    copy = AuditEvent.objects.get(session=session, action="copy_disk")
    assert 0 < copy.data["resumed_from"] <= at_kill
    assert at_kill - copy.data["resumed_from"] <= 8_000_000 * 2.5  # the checkpoint interval is 2 s, at 8 MB/s
    resumed = AuditEvent.objects.get(session=session, action="resume")
    assert resumed.data["step"] == "phase1" and "queued again" in resumed.detail
    workflow.switch_now(operator, session.pk)
    assert_switched(
        lab, reaches(session, SessionStatus.FAILBACK, SessionStatus.FAILED)
    )  # the write made meanwhile arrived


@pytest.mark.process
def test_it_finishes_the_switch_after_the_worker_dies_while_the_guest_shuts_down(lab, operator, clusters):
    replica = make_replica(lab, "db-09", size=16 * MiB, data=8 * MiB, tools_installed=True, shutdown_seconds=2)
    worker = clusters.start()
    session = reaches(start(operator, replica), SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED)
    lab.guest_write(replica.vm_id, "scsi0:0", 12 * MiB, b"late change" * 1000)
    workflow.switch_now(operator, session.pk)
    wait_for(
        lambda: lab.vm_meta(replica.vm_id)["shutdown_requested_at"],
        timeout=60,
        interval=0.05,
        what="the guest shutdown",
    )
    kill_cluster(worker)  # the guest goes on shutting down without anyone watching
    assert session_of(session).status == SessionStatus.SWITCHING
    resume_after_stall(session)
    clusters.start()
    session = reaches(session, SessionStatus.FAILBACK, SessionStatus.FAILED)
    assert_switched(lab, session)
    steps = list(AuditEvent.objects.filter(session=session).order_by("pk").values_list("action", flat=True))
    assert steps.index("switch") < steps.index("resume") < steps.index("stop_replica") < steps.index("finish_switch")
    assert AuditEvent.objects.get(session=session, action="resume").data["step"] == "phase2"


@pytest.mark.process
def test_it_keeps_the_shutdown_deadline_when_the_worker_dies_during_a_hung_shutdown(lab, operator, clusters):
    replica = make_replica(lab, "db-10", size=16 * MiB, data=8 * MiB, tools_installed=True, shutdown_hangs=True)
    worker = clusters.start()
    session = reaches(
        start(operator, replica, shutdown_timeout_s=6), SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED
    )
    workflow.switch_now(operator, session.pk)
    wait_for(
        lambda: lab.vm_meta(replica.vm_id)["shutdown_requested_at"],
        timeout=60,
        interval=0.05,
        what="the guest shutdown",
    )
    kill_cluster(worker)
    resume_after_stall(session)
    clusters.start()
    session = reaches(session, SessionStatus.FAILBACK, SessionStatus.FAILED)
    assert_switched(lab, session)
    assert session.stop_method == "Guest OS did not shut down within 6 s: powered off"
    # The 6 s count from the first shutdown request, not again from the resumed worker's start.
    resumed = wait_for(
        lambda: Task.objects.filter(func="failback.tasks.phase2").first(), timeout=30, what="the resumed task's record"
    )
    deadline = session.replica_stop_started_at + timedelta(seconds=6)
    assert session.replica_off_at >= deadline - timedelta(seconds=0.1)
    # Counted again from the resumed worker's start, the power-off would come 6 s after it; the margin
    # below is for a busy machine, not a timing target.
    assert (session.replica_off_at - max(deadline, resumed.started)).total_seconds() < 5


@pytest.mark.process
def test_it_finishes_the_switch_after_the_worker_dies_during_the_final_delta(lab, operator, clusters):
    replica = make_replica(lab, "files-01", size=256 * MiB, data=256 * MiB, tools_installed=False, cbt=False)
    worker = clusters.start()
    session = reaches(start(operator, replica), SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED)
    for i in range(8):
        lab.guest_write(replica.vm_id, "scsi0:0", i * 32 * MiB, random.Random(i).randbytes(MiB))
    workflow.switch_now(operator, session.pk)
    wait_for(
        lambda: FailbackSession.objects.filter(pk=session.pk, replica_off_at__isnull=False).exists(),
        timeout=60,
        interval=0.01,
        what="the replica off and the final delta begun",
    )
    kill_cluster(worker)
    assert session_of(session).status == SessionStatus.SWITCHING, "the delta ended before the kill: nothing was tested"
    assert lab.power_state(replica.vm_id) == POWERED_OFF  # both VMs are down now: only a resume helps
    resume_after_stall(session)
    clusters.start()
    assert_switched(lab, reaches(session, SessionStatus.FAILBACK, SessionStatus.FAILED))


@pytest.mark.process
def test_it_brings_the_replica_back_when_a_killed_switch_cannot_go_on(lab, operator, clusters):
    replica = make_replica(lab, "db-11", size=16 * MiB, data=8 * MiB, tools_installed=True, shutdown_seconds=1)
    worker = clusters.start()
    session = reaches(start(operator, replica), SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED)
    before = sha256(lab.disk_path(replica.vm_id, "scsi0:0"))
    workflow.switch_now(operator, session.pk)
    wait_for(
        lambda: lab.vm_meta(replica.vm_id)["shutdown_requested_at"],
        timeout=60,
        interval=0.05,
        what="the guest shutdown",
    )
    kill_cluster(worker)
    wait_for(
        lambda: lab.power_state(replica.vm_id) == POWERED_OFF, timeout=10, what="the guest to finish shutting down"
    )
    lab.delete_vm(session.production_vm_id)  # meanwhile someone deleted the (powered-off) production VM
    resume_after_stall(session)
    clusters.start()
    session = reaches(session, SessionStatus.FAILED, SessionStatus.FAILBACK)
    assert_replica_serving(lab, session)
    assert sha256(lab.disk_path(replica.vm_id, "scsi0:0")) == before
    failed = AuditEvent.objects.get(session=session, action="fail_switch")
    assert "replica powered on" in failed.data["recovery"] and session.vm_name in failed.detail


@pytest.mark.process
def test_it_does_not_run_a_switch_twice_when_the_watchdog_looks_while_it_waits_for_a_worker(
    lab, operator, clusters, monkeypatch
):
    monkeypatch.setattr(Conf, "SYNC", True)
    replica = make_replica(lab, "erp-03", size=8 * MiB, data=4 * MiB, tools_installed=False)
    session = session_of(start(operator, replica))  # phase 1 inline; its last heartbeat is now old news
    time.sleep(STALL + 0.5)
    monkeypatch.setattr(Conf, "SYNC", False)
    workflow.switch_now(operator, session.pk)  # queued; no worker is running yet
    assert watchdog.recover_stalled() == []  # just queued is not stalled
    clusters.start()
    assert_switched(lab, reaches(session, SessionStatus.FAILBACK, SessionStatus.FAILED))
    time.sleep(1)
    assert AuditEvent.objects.filter(session=session, action="stop_replica").count() == 1
    assert not AuditEvent.objects.filter(session=session, action="resume").exists()


# -- the guest, the disk --------------------------------------------------------------------------


def test_it_powers_off_a_guest_that_hangs_on_shutdown_at_the_configured_timeout(lab, operator, settings):
    settings.FAILBACK_SHUTDOWN_TIMEOUT = 2  # FAILBACK_SHUTDOWN_TIMEOUT in the environment; DOMAIN's default is 15 min
    replica = make_replica(lab, "mail-01", size=8 * MiB, data=4 * MiB, tools_installed=True, shutdown_hangs=True)
    session = session_of(start(operator, replica))
    assert session.shutdown_timeout_s == 2 and session.status == SessionStatus.READY_TO_SWITCH
    workflow.switch_now(operator, session.pk)
    session = session_of(session)
    assert_switched(lab, session)
    waited = (session.replica_off_at - session.replica_stop_started_at).total_seconds()
    assert 2 <= waited < 5
    stop = AuditEvent.objects.get(session=session, action="stop_replica")
    assert stop.detail == "Guest OS did not shut down within 2 s: powered off"


@pytest.mark.process
def test_it_fails_phase1_clearly_when_the_datastore_fills_up_and_leaves_the_replica_alone(lab, operator, clusters):
    replica = make_replica(lab, "big-02", size=64 * MiB, data=40 * MiB, tools_installed=False)
    before = sha256(lab.disk_path(replica.vm_id, "scsi0:0"))
    with small_datastore(lab, "prod-ds-01", 48 * MiB) as datastore:
        clusters.start()
        session = start(operator, replica, bandwidth_mbps=8)  # the datastore had room when it started
        wait_for(
            lambda: SessionDisk.objects.filter(session=session, bytes_done__gt=8 * MiB).exists(),
            timeout=60,
            what="phase 1 under way",
        )
        fill(datastore)
        session = reaches(session, SessionStatus.FAILED, SessionStatus.READY_TO_SWITCH)
        assert not [p for p in datastore.iterdir() if p.name.startswith("vm-")]  # the half-built production VM is gone
    assert session.status == SessionStatus.FAILED and session.replica.state == ReplicaState.FAILOVER
    assert lab.power_state(replica.vm_id) == POWERED_ON
    assert sha256(lab.disk_path(replica.vm_id, "scsi0:0")) == before
    assert "No space left on datastore prod-ds-01" in session.error
    failed = AuditEvent.objects.get(session=session, action="fail_phase1")
    assert "No space left on datastore prod-ds-01" in failed.detail and "untouched" in failed.detail
    assert AuditEvent.objects.get(session=session, action="delete_production_vm").outcome == Outcome.OK


def test_it_fails_the_switch_clearly_when_the_datastore_fills_up_and_brings_the_replica_back(lab, operator):
    replica = make_replica(lab, "big-03", size=32 * MiB, data=8 * MiB, tools_installed=False)
    with small_datastore(lab, "prod-ds-01", 24 * MiB) as datastore:
        session = session_of(start(operator, replica))
        assert session.status == SessionStatus.READY_TO_SWITCH, session.error
        lab.guest_write(
            replica.vm_id, "scsi0:0", 16 * MiB, random.Random(9).randbytes(8 * MiB)
        )  # new data where there was none
        before = sha256(lab.disk_path(replica.vm_id, "scsi0:0"))
        fill(datastore, leave=MiB)  # less room than the final delta needs
        workflow.switch_now(operator, session.pk)
        session = session_of(session)
    assert_replica_serving(lab, session)
    assert sha256(lab.disk_path(replica.vm_id, "scsi0:0")) == before
    assert "No space left on datastore prod-ds-01" in session.error
    failed = AuditEvent.objects.get(session=session, action="fail_switch")
    assert "No space left on datastore prod-ds-01" in failed.detail and "replica powered on" in failed.data["recovery"]


# -- the scheduler, operators at once ----------------------------------------------------------------


@pytest.mark.process
def test_it_runs_a_switch_missed_while_the_scheduler_was_down_once_and_audits_it_late(
    lab, operator, clusters, monkeypatch
):
    monkeypatch.setattr(Conf, "SYNC", True)  # phase 1 inline, before any cluster exists
    replica = make_replica(lab, "erp-02", size=8 * MiB, data=4 * MiB, tools_installed=False)
    session = session_of(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH
    workflow.schedule_switch(operator, session.pk, timezone.now() + timedelta(hours=1), reason="CHG-42")
    # The hour passed while no scheduler ran: the moment and the schedule's early firing are behind us.
    due = timezone.now() - timedelta(seconds=1)
    FailbackSession.objects.filter(pk=session.pk).update(switch_at=due)
    Schedule.objects.filter(name=schedules.switch_schedule_name(session.pk)).update(
        next_run=due - schedules.SWITCH_LEAD
    )
    clusters.start(), clusters.start()  # two come back at once; each runs django-q2's scheduler after ~30 s
    session = reaches(session, SessionStatus.FAILBACK, SessionStatus.FAILED, timeout=120)
    assert_switched(lab, session)
    time.sleep(2)  # a second firing, had there been one, would have been picked up by now
    switch = AuditEvent.objects.get(session=session, action="switch")  # exactly one switch
    assert switch.outcome == Outcome.OK and switch.actor_name == "system"
    assert switch.data["trigger"] == "scheduled" and switch.data["late"] is True and switch.data["late_s"] > 20
    assert (
        f"{int(switch.data['late_s'])} s late" in switch.detail
        or f"{round(switch.data['late_s'])} s late" in switch.detail
    )
    assert Task.objects.filter(func="failback.tasks.scheduled_switch").count() == 1
    assert AuditEvent.objects.filter(session=session, action="stop_replica").count() == 1


@pytest.mark.process
def test_it_starts_a_scheduled_switch_on_its_second_not_at_the_schedulers_next_look(lab, operator, clusters):
    replica = make_replica(lab, "erp-03", size=8 * MiB, data=4 * MiB, tools_installed=False)
    clusters.start()
    session = reaches(session_of(start(operator, replica)), SessionStatus.READY_TO_SWITCH)
    due = timezone.now() + timedelta(seconds=15)  # nearer than the lead: queued now, waits for the second
    workflow.schedule_switch(operator, session.pk, due, reason="CHG-43")
    session = reaches(session, SessionStatus.FAILBACK, SessionStatus.FAILED, timeout=60)
    assert_switched(lab, session)
    switch = AuditEvent.objects.get(session=session, action="switch")
    started = (switch.at - due).total_seconds()  # the row is written when the switch starts
    print(f"the scheduled switch started {started:.2f} s after its time")  # bench/scheduled_switch.py measures it
    assert started >= 0, "the switch started before its time"
    # On the second, not at the scheduler's next look: the worker held the task before the moment and
    # waited for it itself. (How many seconds after is a figure for the bench, not a test on a busy machine.)
    task = Task.objects.get(func="failback.tasks.scheduled_switch")
    assert task.started < due, (task.started, due)
    assert switch.data["late"] is (switch.data["late_s"] > automatic.SCHEDULE_LATE_AFTER_S)
    assert ("s late" in switch.detail) is switch.data["late"]


def test_it_fires_a_far_switch_schedule_early_enough_to_wait_for_the_second(lab, operator):
    replica = make_replica(lab, "erp-04", size=8 * MiB, data=4 * MiB, tools_installed=False)
    session = session_of(start(operator, replica))
    due = (timezone.now() + timedelta(hours=3)).replace(microsecond=0)
    workflow.schedule_switch(operator, session.pk, due)
    schedule = Schedule.objects.get(name=schedules.switch_schedule_name(session.pk))
    # django-q2 looks at its schedules every 30 s: firing the lead early leaves the task to wait for the moment.
    assert schedule.next_run == due - schedules.SWITCH_LEAD and timedelta(seconds=30) < schedules.SWITCH_LEAD
    automatic.scheduled_switch_due(session.pk)  # fired hours early (moved, or a clock jump): it does not switch
    assert session_of(session).status == SessionStatus.READY_TO_SWITCH
    assert Schedule.objects.get(name=schedules.switch_schedule_name(session.pk)).next_run == schedule.next_run


def test_it_switches_once_when_switch_now_races_the_scheduled_switch(lab, operator):
    replica = make_replica(lab, "web-02", size=8 * MiB, data=4 * MiB, tools_installed=False)
    session = session_of(start(operator, replica))
    workflow.schedule_switch(operator, session.pk, timezone.now() + timedelta(minutes=5))
    FailbackSession.objects.filter(pk=session.pk).update(switch_at=timezone.now())  # the time has come
    results = race(
        lambda: workflow.switch_now(operator, session.pk), lambda: automatic.scheduled_switch_due(session.pk)
    )
    ok, refused = split(results)
    session = session_of(session)
    assert_switched(lab, session)
    assert AuditEvent.objects.filter(session=session, action="switch", outcome=Outcome.OK).count() == 1
    assert AuditEvent.objects.filter(session=session, action="stop_replica").count() == 1
    losers = AuditEvent.objects.filter(session=session, action__in=["switch", "scheduled_switch"]).exclude(
        outcome=Outcome.OK
    )
    assert losers.count() == 1, list(losers.values_list("action", "outcome", "detail"))
    assert "already switched" in losers.get().detail or "skipped" in losers.get().detail


def test_it_lets_only_one_of_switch_now_and_cancel_win(lab, operator):
    replica = make_replica(lab, "web-03", size=8 * MiB, data=4 * MiB, tools_installed=False)
    session = session_of(start(operator, replica))
    assert session.status == SessionStatus.READY_TO_SWITCH
    ok, refused = split(
        race(lambda: workflow.switch_now(operator, session.pk), lambda: workflow.cancel(operator, session.pk))
    )
    assert len(ok) == 1 and len(refused) == 1, refused
    session = session_of(session)
    if session.status == SessionStatus.FAILBACK:  # the switch won: the cancel came too late
        assert_switched(lab, session)
        assert (
            "cancel is possible only before the switch" in refused[0].message or "Cancel refused" in refused[0].message
        )
    else:  # the cancel won: the replica never stopped
        assert session.status == SessionStatus.CANCELLED, session.error
        assert session.replica.state == ReplicaState.FAILOVER and lab.power_state(replica.vm_id) == POWERED_ON
        assert refused[0].message.startswith("Switch now refused")
        assert not AuditEvent.objects.filter(session=session, action="stop_replica").exists()
    assert (
        AuditEvent.objects.filter(
            session=session, action__in=["switch", "cancel", "cancel_ready"], outcome=Outcome.REFUSED
        ).count()
        == 1
    )


# -- the web server ------------------------------------------------------------------------------


@pytest.mark.process
def test_it_catches_websockets_up_after_the_web_server_is_killed(portal, settings):
    from websockets.sync.client import connect

    olivia = portal.users["olivia"]
    replica = replica_named("app-crm-01")
    session = start(olivia, replica)
    wait_for(
        lambda: FailbackSession.objects.get(pk=session.pk).status == SessionStatus.READY_TO_SWITCH,
        timeout=90,
        what="phase 1",
    )
    browser = Client()
    browser.force_login(olivia)
    headers = {"Cookie": f"sessionid={browser.cookies['sessionid'].value}", "Origin": portal.url}
    url = f"ws://127.0.0.1:{portal.port}/ws/sessions/{session.pk}/"
    with connect(url, additional_headers=headers, open_timeout=10) as ws:
        assert "switch manually" in ws.recv(timeout=10)
        portal.stop_web(signal.SIGKILL)
        with pytest.raises(Exception):  # the connection dies with the server
            ws.recv(timeout=10)
    switch_at = (timezone.now() + timedelta(hours=2)).replace(second=0, microsecond=0)
    workflow.schedule_switch(olivia, session.pk, switch_at, reason="changed while the web server was down")
    portal.start_web()
    with connect(url, additional_headers=headers, open_timeout=10) as ws:  # what htmx's ws extension does on its own
        first = ws.recv(timeout=10)
    assert "at a scheduled time" in first and timezone.localtime(switch_at).strftime("%Y-%m-%d %H:%M") in first
