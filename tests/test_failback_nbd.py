"""Whole failbacks on the lab in nbd mode: the worker starts one nbdkit (``file`` plugin) per disk and
side, on loopback with TLS (certificates made here), and the engine reaches the disks only as NBD
exports through libnbd. Byte-identical disks, holes kept, a worker killed with SIGKILL mid-copy that
the next worker resumes, and the switch sending the same bytes as direct mode for the same change."""

import html
import os
import random
import signal
import threading
import time

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django_q.conf import Conf

from failback import watchdog, workflow
from failback.choices import SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_ON
from failback.models import AuditEvent, FailbackSession, SessionDisk
from failback.transfer.sparse import data_extents
from failback.transports import consequence

from .conftest import kill_cluster, start_cluster, wait_for
from .helpers import replica_named, start
from .nbd_support import make_certificates, require_nbd
from .test_views import start_form

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.nbd]

MiB = 1 << 20
STALL = 2


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    require_nbd()
    return make_certificates(str(tmp_path_factory.mktemp("nbd-tls")))


@pytest.fixture
def nbd_mode(settings, certs):
    """The lab's disks reached over NBD, TLS on loopback."""
    settings.LAB_TRANSPORT = "nbd"
    settings.FAILBACK_NBD_TLS_DIR = certs
    return settings


def reload(session):
    return FailbackSession.objects.select_related("replica").get(pk=session.pk)


def extents(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def assert_identical_and_sparse(lab, session):
    for disk in session.disks.all():
        src = lab.disk_path(session.replica.vm_id, disk.key)
        dst = lab.disk_path(session.production_vm_id, disk.key)
        with open(src, "rb") as a, open(dst, "rb") as b:
            assert a.read() == b.read(), f"disk {disk.key} differs"
        outer = extents(src)
        assert all(any(x >= c and y <= d for c, d in outer) for x, y in extents(dst)), "a hole was filled"
        assert sum(y - x for x, y in extents(dst)) <= sum(y - x for x, y in outer)
        assert disk.verified and disk.source_digest == disk.target_digest != ""


def make_replica(lab, name, *, size=64 * MiB, chunks=((0, 8 * MiB), (24 * MiB, 4 * MiB), (60 * MiB, MiB)), seed=5):
    """A running replica with data in a few places and holes between, imported into the portal."""
    vm_id = lab.create_vm(
        f"{name}_replica",
        host="esx-dr-01",
        datastore="dr-ds-01",
        disks=[size],
        networks=["dr-net"],
        power_on=True,
        tools_installed=False,
    )
    rng = random.Random(seed)
    with open(lab.disk_path(vm_id, "scsi0:0"), "r+b") as disk:
        for offset, n in chunks:
            disk.seek(offset)
            disk.write(rng.randbytes(n))
    call_command("seed_lab", "--no-user", stdout=open(os.devnull, "w"))
    return replica_named(name)


def test_it_fails_back_the_lab_over_nbd_with_identical_disks_and_holes_kept(lab, operator, nbd_mode):
    replica = make_replica(lab, "nbd-01")
    session = reload(start(operator, replica, switch_mode=SwitchMode.MANUAL))
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    disk = session.disks.get()
    assert disk.bytes_total == 13 * MiB  # announced from block status: the allocated extents only
    lab.guest_write(replica.vm_id, disk.key, 40 * MiB + 4096, b"\xa5" * 8192)  # after phase 1
    workflow.switch_now(operator, session.pk, reason="CHG-18")
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert lab.power_state(session.production_vm_id) == POWERED_ON
    assert_identical_and_sparse(lab, session)
    disk.refresh_from_db()
    assert disk.phase1_bytes_written == 13 * MiB
    assert disk.method == "tracked" and disk.phase2_bytes_written == 8192  # only the changed pages
    sent = AuditEvent.objects.get(session=session, action="send_changes")
    assert sent.data["bytes_written"] == 8192


def test_the_switch_sends_the_same_bytes_over_nbd_as_direct_for_the_same_change(lab, operator, settings, certs):
    """Same replica shape, same change after phase 1: the final delta writes exactly as many bytes in
    both modes (the window's time is the bench's: bench/transfer_nbd.py)."""
    require_nbd()
    written = {}
    for mode in ("direct", "nbd"):
        settings.LAB_TRANSPORT = mode
        settings.FAILBACK_NBD_TLS_DIR = certs if mode == "nbd" else ""
        replica = make_replica(lab, f"same-{mode}", seed=7)
        session = reload(start(operator, replica, switch_mode=SwitchMode.MANUAL))
        disk = session.disks.get()
        for offset in (MiB + 100, 30 * MiB, 63 * MiB):  # into data, into a hole, near the end
            lab.guest_write(replica.vm_id, disk.key, offset, bytes(range(256)) * 64)
        workflow.switch_now(operator, session.pk)
        session = reload(session)
        assert session.status == SessionStatus.FAILBACK, session.error
        assert_identical_and_sparse(lab, session)
        disk.refresh_from_db()
        written[mode] = (disk.method, disk.phase2_bytes_written, disk.phase1_bytes_written)
    assert written["nbd"] == written["direct"]
    assert written["nbd"][1] <= 3 * 5 * 4096  # the changed pages, not the disk


@pytest.fixture
def clusters(settings, monkeypatch, tmp_path):
    monkeypatch.setattr(Conf, "SYNC", False)
    settings.FAILBACK_STALL_SECONDS = STALL
    started = []
    log = tmp_path / "qcluster.log"

    def start_one(**env):
        started.append(start_cluster(settings, log, **env))
        return started[-1]

    yield start_one
    for proc in started:
        kill_cluster(proc)
    if log.exists():
        print(log.read_text(errors="replace")[-4000:])


@pytest.mark.process
def test_a_worker_killed_mid_copy_over_nbd_is_resumed_by_the_next(lab, operator, nbd_mode, clusters):
    replica = make_replica(lab, "nbd-kill", size=96 * MiB, chunks=((0, 40 * MiB), (64 * MiB, 16 * MiB)))
    env = {"LAB_TRANSPORT": "nbd", "FAILBACK_NBD_TLS_DIR": nbd_mode.FAILBACK_NBD_TLS_DIR}
    worker = clusters(**env)
    session = start(operator, replica, bandwidth_mbps=8)  # 8 MB/s: several seconds of copying
    wait_for(
        lambda: SessionDisk.objects.filter(session=session, bytes_done__gt=20 * MiB).exists(),
        timeout=60,
        what="phase 1 under way over NBD",
    )
    kill_cluster(worker)  # SIGKILL to the worker's process group: its nbdkit servers go with it
    at_kill = SessionDisk.objects.get(session=session).bytes_done
    lab.guest_write(replica.vm_id, "scsi0:0", 2 * MiB, b"written while no worker ran" * 4096)
    time.sleep(STALL + 0.5)
    assert watchdog.recover_stalled() == [session.pk]
    clusters(**env)
    wait_for(
        lambda: FailbackSession.objects.get(pk=session.pk).status
        in (SessionStatus.READY_TO_SWITCH, SessionStatus.FAILED),
        timeout=90,
        what="phase 1 resumed",
    )
    session = reload(session)
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    copy = AuditEvent.objects.get(session=session, action="copy_disk")
    assert 0 < copy.data["resumed_from"] <= at_kill  # resumed into the same export, not started afresh
    workflow.switch_now(operator, session.pk)
    wait_for(
        lambda: FailbackSession.objects.get(pk=session.pk).status in (SessionStatus.FAILBACK, SessionStatus.FAILED),
        timeout=90,
        what="switch over NBD",
    )
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    wait_for(lambda: lab.power_state(session.production_vm_id) == POWERED_ON, timeout=30, what="production on")
    assert_identical_and_sparse(lab, session)  # the write made meanwhile arrived too


def test_the_start_wizard_says_what_the_transport_sends(lab, operator, settings):
    replica = replica_named("app-crm")
    client = Client()
    client.force_login(operator)
    url = reverse("failback:start", args=[replica.pk])
    for transport in ("direct", "nbd"):
        settings.LAB_TRANSPORT = transport
        review = client.post(url, start_form(replica, step="review")).content.decode()
        assert "<dt>Disk transport</dt>" in review
        assert html.escape(f"{transport}: {consequence(transport)}", quote=True) in review


def _nbdkit_children(writable):
    """This process's nbdkit servers (the inline worker's), the production side's or the replica's."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and args and args[0].endswith(b"nbdkit") and (b"--readonly" not in args) == writable:
            found.append(int(pid))
    return found


def test_an_nbd_server_that_goes_away_mid_copy_is_started_again_and_the_copy_resumes(lab, operator, nbd_mode):
    replica = make_replica(lab, "nbd-gone", size=64 * MiB, chunks=((0, 40 * MiB),))
    killed = []

    def pull_the_plug():  # the production disk's nbdkit dies once the copy is well under way
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if SessionDisk.objects.filter(bytes_done__gt=12 * MiB).exists():
                for pid in _nbdkit_children(writable=True):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    plug = threading.Thread(target=pull_the_plug)
    plug.start()
    try:
        session = reload(start(operator, replica, bandwidth_mbps=8))  # inline: the worker is this process
    finally:
        plug.join()
    assert killed, "the server was not killed mid-copy: nothing was tested"
    assert session.status == SessionStatus.READY_TO_SWITCH, session.error
    again = AuditEvent.objects.get(session=session, action="copy_disk", outcome="info")
    assert "An NBD server went away mid-copy" in again.detail and "failed" in again.detail
    assert "attempt 2 of 3" in again.detail
    copy = AuditEvent.objects.get(session=session, action="copy_disk", outcome="ok")
    assert copy.data["resumed_from"] > 0  # from the checkpoint, not from the start
    workflow.switch_now(operator, session.pk)
    session = reload(session)
    assert session.status == SessionStatus.FAILBACK, session.error
    assert_identical_and_sparse(lab, session)
