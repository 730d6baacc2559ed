"""The long-running steps of a failback, run by django-q2 workers (see tasks.py).

Each step talks to the platform only through the hypervisor interface and to the disks only
through the transfer engine, and changes state only through ``workflow.transition``. What every
step did, with its figures, goes to the audit trail.
"""

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from contextlib import closing, contextmanager
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F
from django.utils import timezone

from . import broadcast, prediction, workflow
from . import checks as prechecks
from .choices import Outcome, SessionStatus
from .hypervisors.base import POWERED_OFF, POWERED_ON, SUSPENDED, NotFound
from .hypervisors.registry import hypervisor_for
from .models import AuditEvent, FailbackSession, Replica, SessionDisk
from .transfer import TransferCancelled, delta_copy, full_copy, verify_changes
from .transfer.sparse import allocated_bytes

log = logging.getLogger(__name__)


def _state_dir(session_id, disk_key):
    path = settings.FAILBACK_STATE_DIR / str(session_id) / disk_key.replace(":", "_").replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@contextmanager
def session_lock(session_id, *, wait=True):
    """One worker touches a session's production disks at a time (phase 1, catch-up, switch, cancel).

    An flock: the kernel releases it when a worker dies, so a resumed step never waits for a corpse.
    Yields False when ``wait`` is off and another worker holds it."""
    folder = settings.FAILBACK_STATE_DIR / str(session_id)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


LeaseLost = workflow.LeaseLost


class Run:
    """One run of a step, holding the session's lease: a fencing token that only grows.

    Taking the lease (``Run.take``) adds one to the session's ``lease``, so a run started later for the
    same session (the watchdog resuming a step it thought dead) fences every earlier one: their progress
    saves, audit rows, state changes and platform actions check the token and raise LeaseLost instead
    of writing. The engine sees the fence through ``fence``, which it polls at every block."""

    CHECK_EVERY_S = 1.0  # how stale the engine's view of the lease may be (a pause makes it stale at once)

    def __init__(self, session_id, token):
        self.session_id, self.token = session_id, token
        self.lost = False
        self.checked = time.monotonic()

    @classmethod
    def take(cls, session_id, *statuses):
        """The lease for a run of the step of ``statuses``; None when the session is no longer there."""
        with transaction.atomic():
            if not FailbackSession.objects.filter(pk=session_id, status__in=statuses).update(lease=F("lease") + 1, heartbeat_at=timezone.now()):
                return None
            return cls(session_id, FailbackSession.objects.values_list("lease", flat=True).get(pk=session_id))

    def mine(self):
        return FailbackSession.objects.filter(pk=self.session_id, lease=self.token)

    def check(self):
        self.checked = time.monotonic()
        if self.lost or not self.mine().exists():
            self.lost = True
            raise LeaseLost(f"failback #{self.session_id}: lease {self.token} was taken over")

    def fence(self, cancel):
        """An ``is_set()`` for the engine: true once ``cancel`` is set or the lease is gone."""
        return Fence(self, cancel)

    def hypervisor(self, hv):
        return FencedHypervisor(hv, self)

    @contextmanager
    def beating(self):
        """Renew the heartbeat every FAILBACK_HEARTBEAT_SECONDS while the run works or waits (for the
        session's lock, a guest, the platform), so the watchdog takes over silent runs, not slow ones.
        A paused process pauses this thread too: its lease can still be taken over."""
        stop = threading.Event()

        def renew():
            try:
                while not stop.wait(settings.FAILBACK_HEARTBEAT_SECONDS):
                    try:
                        if not self.mine().update(heartbeat_at=timezone.now()):
                            return  # taken over (or not visible yet): the run's own checks decide
                    except DatabaseError:
                        continue  # the database is busy: try again at the next beat
            finally:
                connection.close()

        beater = threading.Thread(target=renew, name=f"heartbeat-{self.session_id}", daemon=True)
        beater.start()
        try:
            yield self
        finally:
            stop.set()
            beater.join()


class Fence:
    """What the engine polls at every block in place of its cancel event."""

    def __init__(self, run, cancel):
        self.run, self.cancel = run, cancel

    def is_set(self):
        if self.cancel.is_set() or self.run.lost:
            return True
        if time.monotonic() - self.run.checked >= Run.CHECK_EVERY_S:
            try:
                self.run.check()
            except LeaseLost:
                return True
        return False


class FencedHypervisor:
    """The platform as one run sees it: an action that changes a VM first checks the run's lease."""

    ACTIONS = frozenset({"create_vm_like", "delete_vm", "power_on", "power_off", "shutdown_guest", "copy_disk_network"})

    def __init__(self, inner, run):
        self._inner, self._run = inner, run

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in self.ACTIONS:
            return attr

        def fenced(*args, **kwargs):
            self._run.check()
            return attr(*args, **kwargs)

        return fenced


def _note(session, action, detail, *, outcome=Outcome.OK, data=None, run=None):
    with transaction.atomic():
        if run is not None and not run.mine().select_for_update().exists():
            run.lost = True
            raise LeaseLost(f"failback #{session.pk}: {action} not written, the step was taken over")
        workflow.audit(action=action, outcome=outcome, session=session, from_state=session.status, to_state=session.status, detail=detail, data=data)
        broadcast.session_changed(session.pk)


def _save(obj, run=None, **fields):
    """Save only the fields given; with a run, only while it holds the lease (else LeaseLost)."""
    for name, value in fields.items():
        setattr(obj, name, value)
    rows = type(obj).objects.filter(pk=obj.pk)
    if run is not None:
        rows = rows.filter(lease=run.token) if isinstance(obj, FailbackSession) else rows.filter(session__lease=run.token)
    if not rows.update(**fields) and run is not None:
        run.lost = True
        raise LeaseLost(f"failback #{run.session_id}: {', '.join(fields)} not saved, the step was taken over")


SAMPLE_EVERY = 1.0  # seconds between throughput samples kept for the chart
MAX_SAMPLES = 2000


class ProgressSink:
    """Receives the engine's (already rate-bounded) progress; saves the fields it changes and nudges.

    It also notices a cancel or a switch: when the session has left ``expect``, it sets ``cancel``
    and the engine stops at once, its checkpoint intact."""

    def __init__(self, disk, *, expect, cancel, run, show=True):
        self.disk, self.expect, self.cancel, self.run, self.show = disk, expect, cancel, run, show
        self.samples = list(FailbackSession.objects.filter(pk=disk.session_id).values_list("throughput", flat=True).first() or [])
        self.last_sample = 0.0

    def __call__(self, p):
        fields = {"heartbeat_at": timezone.now()}
        if self.run.lost:
            return
        if self.show:
            try:
                _save(self.disk, self.run, bytes_total=p.bytes_total, bytes_done=p.bytes_done, bytes_written=p.bytes_written, rate_bps=p.rate_bps,
                      eta_s=p.eta_seconds)
            except LeaseLost:
                self.cancel.set()  # the engine stops at its next block; the run then raises LeaseLost
                return
            now = time.time()
            if now - self.last_sample >= SAMPLE_EVERY:
                self.last_sample = now
                self.samples = (self.samples + [[round(now, 1), round(p.rate_bps), self.disk.phase]])[-MAX_SAMPLES:]
                fields["throughput"] = self.samples
        self.run.checked = time.monotonic()
        if not self.run.mine().filter(status=self.expect).update(**fields):
            self.run.lost = not self.run.mine().exists()
            self.cancel.set()
        if self.show:
            broadcast.send_now(self.disk.session_id)


def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


# -- phase 1 -----------------------------------------------------------------------------------

def _beat(run, *_):
    if not run.mine().update(heartbeat_at=timezone.now()):
        run.lost = True
        raise LeaseLost(f"failback #{run.session_id}: the step was taken over")


def _take(session_id, status, action, not_run):
    """The session and a lease for a run of the step of ``status``; the run is None, and that is noted,
    when the session has moved on (a task delivered twice, or late)."""
    session = FailbackSession.objects.select_related("replica").get(pk=session_id)
    run = Run.take(session_id, status)
    if run is None:
        session.refresh_from_db()
        _note(session, action, f"{not_run}: failback #{session.pk} is {session.get_status_display()}", outcome=Outcome.INFO)
    return session, run


@contextmanager
def superseded(session_id, step):
    """Around a run: a run that lost its lease ends here quietly; the run that took over carries on."""
    try:
        yield
    except LeaseLost as lost:
        log.warning("%s of failback #%s stopped without writing: %s", step, session_id, lost)


def run_phase1(session_id, resume=False):
    with superseded(session_id, "phase 1"):
        _run_phase1(session_id, resume)


def _run_phase1(session_id, resume):
    if resume:  # the watchdog found phase 1 without a worker: carry on from the checkpoints
        session, run = _take(session_id, SessionStatus.PHASE1, "resume", "Phase 1 not resumed")
        if run is None:
            return
    else:
        run = Run.take(session_id, SessionStatus.QUEUED)
        try:
            session = workflow.transition(session_id, "begin_phase1", lease=run.token if run else None,
                                          phase1_started_at=timezone.now(), heartbeat_at=timezone.now())
        except workflow.Refused:
            return  # delivered twice or cancelled meanwhile: the refusal is in the audit trail
    with run.beating(), session_lock(session.pk), closing(hypervisor_for(session.replica)) as platform:
        run.check()  # the lock may have been held by an earlier run that was paused, not dead
        hv = run.hypervisor(platform)
        if _phase1(run, session, hv):
            _refresh_readiness(FailbackSession.objects.select_related("replica").get(pk=session.pk), hv)
    workflow.after_phase1(session.pk)


def _reusable_state(session, disk):
    """A retry of a cancelled failback that kept its VM: the copy map of what that VM's disk holds."""
    if not session.reused_from_id:
        return False
    old = settings.FAILBACK_STATE_DIR / str(session.reused_from_id) / disk.key.replace(":", "_").replace("/", "_")
    new = _state_dir(session.pk, disk.key)
    if old.is_dir() and not os.listdir(new):
        shutil.copytree(old, new, dirs_exist_ok=True)
    return bool(os.listdir(new))


def _announce_phase1(run, session, hv, disks):
    """Say, before any byte moves, which method each disk uses and why, and how much it holds."""
    for disk in disks:
        if _network(hv) or disk.method:  # network copies state their own; on a resume the method is already stated
            continue
        with open(hv.disk_path(session.replica.vm_id, disk.key), "rb") as f:
            allocated = allocated_bytes(f.fileno(), 0, disk.capacity_bytes)
        if _reusable_state(session, disk):
            method, why = "digest", (f"Retry: the production VM kept by failback #{session.reused_from_id} already holds most data; "
                                     "block digests are compared and only blocks that differ are sent")
        else:
            method, why = "full", "Phase 1 copies every allocated block; holes and zero blocks are skipped"
        _save(disk, run, phase=1, method=method, method_reason=why, bytes_total=allocated, bytes_done=0, eta_s=None)
    broadcast.send_now(session.pk)


def _phase1(run, session, hv):
    replica = session.replica
    cancel = threading.Event()
    results = []
    try:
        if not session.production_vm_id:
            vm_id = hv.create_vm_like(replica.vm_id, name=session.vm_name, host=session.target_host,
                                      datastore=session.target_datastore, network_map=session.network_map,
                                      resource_pool=session.resource_pool or None, folder=session.folder or None,
                                      owner_tag=session.owner_tag or None)
            _save(session, run, production_vm_id=vm_id)
            _note(session, "create_production_vm", f"Created production VM {session.vm_name} ({vm_id}) on {session.target_host}/{session.target_datastore} like {replica.name}",
                  data={"vm_id": vm_id, "owner_tag": session.owner_tag}, run=run)
        limit = session.bandwidth_mbps * 1_000_000 if session.bandwidth_mbps else None
        disks = list(session.disks.all())
        _announce_phase1(run, session, hv, disks)
        for disk in disks:
            disk.refresh_from_db()
            # On a resume the first change id stays: it covers every write since the copy began.
            change_id = disk.change_id or hv.change_tracking(replica.vm_id, disk.key) or ""
            if _network(hv):
                _network_copy(run, hv, session, disk, phase=1)
                continue
            _save(disk, run, change_id=change_id)
            src, dst, state = hv.disk_path(replica.vm_id, disk.key), hv.disk_path(session.production_vm_id, disk.key), _state_dir(session.pk, disk.key)
            sink = ProgressSink(disk, expect=SessionStatus.PHASE1, cancel=cancel, run=run)
            copy_args = {"state_dir": state, "progress": sink, "progress_interval": settings.FAILBACK_PROGRESS_INTERVAL,
                         "bandwidth_limit_bps": limit, "cancel": run.fence(cancel)}
            if disk.method == "digest":  # a retry onto the kept VM: only what differs
                result = delta_copy(src, dst, changed_extents=None, **copy_args)
            else:
                result = full_copy(src, dst, **copy_args)
            results.append(result)
            _save(disk, run, bytes_total=result.bytes_total, bytes_done=result.bytes_total, bytes_written=result.bytes_written,
                  phase1_bytes_written=result.bytes_written, phase1_digest=result.digest, eta_s=0)
            how = "only blocks that differ from the kept VM" if disk.method == "digest" else "full copy"
            _note(session, "copy_disk", f"Disk {disk.key}: {_mib(result.bytes_read)} read, {_mib(result.bytes_written)} written in {result.seconds:.1f} s ({how})",
                  data={"disk": disk.key, "method": disk.method, "bytes_read": result.bytes_read, "bytes_written": result.bytes_written,
                        "zero_bytes_skipped": result.zero_bytes_skipped, "seconds": round(result.seconds, 3), "digest": result.digest,
                        "resumed_from": result.resumed_from, "change_id": change_id, "reused_from": session.reused_from_id}, run=run)
        base = prediction.phase1_rates(results) if results else {}
        workflow.transition(session.pk, "finish_phase1", lease=run.token, phase1_ended_at=timezone.now(),
                            prediction={**(session.prediction or {}), "base": base},
                            detail="Production VM holds the replica's data as of now; the replica keeps running")
    except LeaseLost:
        raise
    except TransferCancelled:
        run.check()  # a lost lease stops here, silently; a cancel is noted
        _note(session, "phase1", "Phase 1 stopped: the failback is being cancelled; the copy checkpoint is kept until the cancel step decides",
              outcome=Outcome.INFO, run=run)
        return False
    except Exception as exc:
        log.exception("phase 1 of session %s failed", session.pk)
        run.check()
        _discard_production_vm(session, hv, run)
        reason = _reason(session, exc)
        workflow.transition(session.pk, "fail_phase1", lease=run.token, error=f"{type(exc).__name__}: {reason}",
                            detail=f"Phase 1 failed: {reason}. The replica is untouched and still running in Failover.",
                            data={"error": reason, "original": str(exc), "type": type(exc).__name__})
        _drop_state(session.pk)
        return False
    return True


def _reason(session, exc):
    """The error as the admin should read it: a full disk says which one; anything else as raised."""
    if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return str(exc)
    if shutil.disk_usage(settings.FAILBACK_STATE_DIR).free < 1 << 20:
        return f"No space left in the portal's state directory {settings.FAILBACK_STATE_DIR} ({exc})"
    return f"No space left on datastore {session.target_datastore} while writing the disks of production VM {session.vm_name} ({exc})"


def _network(hv):
    return getattr(hv, "transport", "direct") == "network"


def _network_digest(hv, vm_id, disk_key, capacity, chunk=8 << 20):
    digest = hashlib.sha256()
    for offset in range(0, capacity, chunk):
        digest.update(hv.download_range(vm_id, disk_key, offset, min(chunk, capacity - offset)))
    return f"sha256:{digest.hexdigest()}"


def _network_copy(run, hv, session, disk, *, phase):
    """Network transport: the datastore HTTP interface reads ranges but writes whole files only, so
    both phases stream the whole disk (a GET piped into a PUT). Phase 2 verifies by reading both disks
    back over HTTP and comparing SHA-256 digests."""
    replica = session.replica
    why = ("Network transport: the whole disk is streamed through the datastore HTTP interface (GET piped into PUT)" if phase == 1 else
           "Network transport cannot write ranges: the whole disk is sent again while the replica is off")
    _save(disk, run, phase=phase, method="full", method_reason=why, bytes_total=disk.capacity_bytes, bytes_done=0, bytes_written=0, eta_s=None)
    broadcast.send_now(session.pk)
    started = time.monotonic()
    sent = hv.copy_disk_network(replica.vm_id, session.production_vm_id, disk.key)
    seconds = time.monotonic() - started
    fields = {"bytes_done": disk.capacity_bytes, "bytes_written": sent, "rate_bps": sent / seconds if seconds else 0, "eta_s": 0}
    data = {"disk": disk.key, "method": "full", "transport": "network", "why": why, "bytes_written": sent, "seconds": round(seconds, 3)}
    if phase == 1:
        _save(disk, run, phase1_bytes_written=sent, **fields)
        _note(session, "copy_disk", f"Disk {disk.key}: {_mib(sent)} sent over the network in {seconds:.1f} s (full copy)", data=data, run=run)
        return
    source_digest = _network_digest(hv, replica.vm_id, disk.key, disk.capacity_bytes)
    target_digest = _network_digest(hv, session.production_vm_id, disk.key, disk.capacity_bytes)
    verified = source_digest == target_digest
    _save(disk, run, phase2_bytes_written=sent, source_digest=source_digest, target_digest=target_digest, verified=verified, **fields)
    data.update(source_digest=source_digest, target_digest=target_digest)
    if not verified:
        raise RuntimeError(f"Disk {disk.key} differs after the final copy: replica {source_digest}, production {target_digest}")
    _note(session, "send_changes", f"Disk {disk.key}: {_mib(sent)} sent over the network (whole disk); production disk verified identical", data=data, run=run)


def owned_vm(session, hv):
    """The production VM this session can prove it created: its recorded id, or (when the answer to the
    create was lost) the VM carrying its owner tag. Never a VM found by name alone: another failback may
    have built a VM of that name. (vm_id, why not) — vm_id None when there is none to touch."""
    vm_id = session.production_vm_id
    if not vm_id:
        if not session.owner_tag:
            return None, "no production VM was recorded"
        vm_id = hv.find_owned_vm(session.owner_tag)
        return (vm_id, "") if vm_id else (None, "no VM carries this failback's owner tag")
    try:
        owner = hv.vm_owner(vm_id)
    except NotFound:
        return None, f"production VM {session.vm_name} ({vm_id}) no longer exists"
    if session.owner_tag and owner != session.owner_tag:
        return None, f"VM {vm_id} does not carry this failback's owner tag (it has {owner or 'none'}): it is not this failback's"
    return vm_id, ""


def _discard_production_vm(session, hv, run=None):
    try:
        vm_id, why_not = owned_vm(session, hv)
    except LeaseLost:
        raise
    except Exception as exc:
        vm_id, why_not = None, f"the platform could not say which VM is this failback's: {exc}"
    if vm_id is None:
        if session.production_vm_id:  # a recorded VM that is gone, or not this failback's: say so
            _note(session, "delete_production_vm", f"Nothing discarded: {why_not}", outcome=Outcome.INFO, data={"why": why_not}, run=run)
        return
    try:
        if hv.power_state(vm_id) != POWERED_OFF:
            hv.power_off(vm_id)
        hv.delete_vm(vm_id)
        unrecorded = "" if session.production_vm_id else " (created by the platform although its answer never arrived; found by its owner tag)"
        _note(session, "delete_production_vm", f"Discarded the half-built production VM {session.vm_name} ({vm_id}){unrecorded}",
              data={"vm_id": vm_id, "owner_tag": session.owner_tag}, run=run)
    except LeaseLost:
        raise
    except Exception as exc:
        _note(session, "delete_production_vm", f"Could not discard production VM {session.vm_name}: {exc}", outcome=Outcome.FAILED,
              data={"error": str(exc)}, run=run)


def _drop_state(session_id):
    shutil.rmtree(settings.FAILBACK_STATE_DIR / str(session_id), ignore_errors=True)


# -- phase 2 -----------------------------------------------------------------------------------

def _stop_replica(run, session, hv):
    """DOMAIN phase 2 step 1: guest shutdown when tools run, power off after the timeout, or at once."""
    vm = session.replica.vm_id
    state = hv.power_state(vm)
    if state == POWERED_OFF:
        return "The replica was already powered off"
    if state == SUSPENDED:
        hv.power_off(vm)
        return "The replica was suspended: powered off at once"
    if not hv.tools_running(vm):
        hv.power_off(vm)
        return "No guest tools running on the replica: powered off at once"
    hv.shutdown_guest(vm)  # on a resume the guest may be shutting down already: asking again is harmless
    # The timeout counts from the first request, so a worker restart does not extend the downtime.
    spent = (timezone.now() - session.replica_stop_started_at).total_seconds() if session.replica_stop_started_at else 0
    deadline = time.monotonic() + max(0.0, session.shutdown_timeout_s - spent)
    pause = min(0.5, session.shutdown_timeout_s / 10)
    while time.monotonic() < deadline:
        if hv.power_state(vm) == POWERED_OFF:
            return "Guest OS shut down"
        _beat(run)
        time.sleep(pause)
    hv.power_off(vm)
    return f"Guest OS did not shut down within {session.shutdown_timeout_s} s: powered off"


def run_switch(session_id):
    with superseded(session_id, "phase 2"):
        session, run = _take(session_id, SessionStatus.SWITCHING, "phase2", "Phase 2 not run")
        if run is None:
            return
        # A catch-up sync still running lost its lease to this run: it lets go at its next tick.
        with run.beating(), session_lock(session.pk), closing(hypervisor_for(session.replica)) as platform:
            run.check()
            session.refresh_from_db()  # an earlier run may have stopped the replica meanwhile
            _switch(run, session, run.hypervisor(platform))


def _announce_phase2(run, session, hv):
    """Before the replica goes down: predict the window once more, and state each disk's method and why."""
    forecast = prediction.predict(hv, session)
    shown = session.predicted_window_s
    _save(session, run, prediction={**(session.prediction or {}), "at_switch": forecast, "shown_s": shown}, predicted_window_s=forecast["window_s"])
    for item in forecast["disks"]:
        SessionDisk.objects.filter(session=session, key=item["disk"]).update(
            phase=2, method=item["method"], method_reason=item["why"][:300], bytes_done=0, bytes_total=item["pending_bytes"], bytes_written=0, eta_s=None)
    _note(session, "predict_window", f"Predicted switch window {forecast['window_s']:.1f} s: guest shutdown {forecast['shutdown_s']:.1f} s "
          f"({forecast['shutdown_basis']}), data {forecast['data_s']:.1f} s for {_mib(forecast['changed_bytes'])} changed ({forecast['data_basis']}), "
          f"power-on {forecast['power_on_s']:.1f} s ({forecast['power_on_basis']})", outcome=Outcome.INFO, data=forecast, run=run)


def _switch(run, session, hv):
    replica = session.replica
    written = 0
    timing = {"delta_s": 0.0, "delta_bytes": 0, "verify_s": 0.0, "verify_bytes": 0}
    try:
        if session.replica_off_at is None:  # on a resume after the replica went off, it stays off
            if session.replica_stop_started_at is None:
                _announce_phase2(run, session, hv)
                _save(session, run, replica_stop_started_at=timezone.now())
            how = _stop_replica(run, session, hv)
            _save(session, run, replica_off_at=timezone.now(), stop_method=how, heartbeat_at=timezone.now())
            _note(session, "stop_replica", how, run=run)
        for disk in session.disks.all():
            if _network(hv):
                _network_copy(run, hv, session, disk, phase=2)
                continue
            src, dst = hv.disk_path(replica.vm_id, disk.key), hv.disk_path(session.production_vm_id, disk.key)
            extents = None
            if disk.change_id:
                areas = hv.changed_areas(replica.vm_id, disk.key, disk.change_id)
                extents = list(areas.extents)
                method, why = "tracked", f"Change tracking: {len(extents)} extents ({_mib(sum(n for _, n in extents))}) changed since phase 1 began"
            else:
                method, why = "digest", "Change tracking unavailable on this VM: reading the replica once and comparing block digests"
            _save(disk, run, phase=2, method=method, method_reason=why, bytes_done=0, bytes_total=0, bytes_written=0, eta_s=None)
            stop = threading.Event()
            result = delta_copy(src, dst, state_dir=_state_dir(session.pk, disk.key), changed_extents=extents,
                                progress=ProgressSink(disk, expect=SessionStatus.SWITCHING, cancel=stop, run=run),
                                progress_interval=settings.FAILBACK_PROGRESS_INTERVAL, cancel=run.fence(stop))
            written += result.bytes_written
            timing["delta_s"] += result.seconds
            timing["delta_bytes"] += max(result.bytes_read, result.bytes_written)
            # The proof reads what changed, not the whole disks: both digests come from the leaves the
            # passes kept, the files' seals show nothing wrote to them since, and sampled grains are re-read.
            beat = lambda *_: _beat(run)  # noqa: E731  a broken seal means a full re-read, which can take a while
            proof = verify_changes(src, dst, state_dir=_state_dir(session.pk, disk.key), progress=beat, progress_interval=5)
            timing["verify_s"] += proof.seconds
            timing["verify_bytes"] += proof.bytes_read
            source_digest, target_digest = proof.source_digest, proof.target_digest
            verified = proof.identical and target_digest == result.digest
            _save(disk, run, bytes_total=result.bytes_total, bytes_done=result.bytes_total, bytes_written=result.bytes_written, eta_s=0,
                  phase2_bytes_written=result.bytes_written, source_digest=source_digest, target_digest=target_digest, verified=verified)
            data = {"disk": disk.key, "method": method, "why": why, "bytes_read": result.bytes_read, "bytes_written": result.bytes_written,
                    "seconds": round(result.seconds, 3), "source_digest": source_digest, "target_digest": target_digest,
                    "proof": {"source_sealed": proof.source_sealed, "target_sealed": proof.target_sealed, "sampled_grains": proof.sampled_grains,
                              "bytes_read": proof.bytes_read, "seconds": round(proof.seconds, 3)},
                    "production_untouched_since_last_pass": result.target_untouched}
            if not verified:
                raise RuntimeError(f"Disk {disk.key} differs after the final delta: replica {source_digest}, production {target_digest}")
            _note(session, "send_changes", f"Disk {disk.key}: {_mib(result.bytes_written)} of changes sent ({method}); production disk verified identical",
                  data=data, run=run)
        session = workflow.transition(session.pk, "finish_switch", lease=run.token, phase2_ended_at=timezone.now(), heartbeat_at=timezone.now(),
                                      detail="The workload now belongs to the production VM",
                                      then=workflow.arm_commit_policy)
    except LeaseLost:
        raise
    except Exception as exc:
        log.exception("phase 2 of session %s failed", session.pk)
        run.check()
        _recover_replica(run, session, hv, exc)
        return
    if session.power_on_after:
        _power_on_production(run, session, hv)
    _record_window(run, session, timing)


def _power_on_production(run, session, hv):
    try:
        if hv.power_state(session.production_vm_id) != POWERED_ON:
            hv.power_on(session.production_vm_id)
        _save(session, run, production_on_at=timezone.now())
        _note(session, "power_on_production", f"Powered on production VM {session.vm_name}", run=run)
    except LeaseLost:
        raise
    except Exception as exc:
        _note(session, "power_on_production", f"Could not power on production VM {session.vm_name}: {exc}", outcome=Outcome.FAILED,
              data={"error": str(exc)}, run=run)


def run_power_on(session_id):
    """The watchdog found a switched session whose production VM was never powered on (worker lost)."""
    with superseded(session_id, "power on"):
        session = FailbackSession.objects.select_related("replica").get(pk=session_id)
        if session.status != SessionStatus.FAILBACK or session.production_on_at or not session.power_on_after:
            return
        run = Run.take(session_id, SessionStatus.FAILBACK)
        if run is None:
            return
        with run.beating(), closing(hypervisor_for(session.replica)) as platform:
            _power_on_production(run, session, run.hypervisor(platform))


def _record_window(run, session, timing):
    window = session.switch_window
    if window is not None:
        actual = window.total_seconds()
        forecast = (session.prediction or {}).get("at_switch") or {}
        predicted = forecast.get("window_s")
        versus = f"; predicted {predicted:.1f} s ({actual - predicted:+.1f} s)" if predicted is not None else ""
        learned = prediction.learn(session, timing)
        _note(session, "switch_window", run=run, detail=f"Switch window {actual:.1f} s (replica going down → production {'on' if session.production_on_at else 'ready'}){versus}",
              outcome=Outcome.INFO, data={"seconds": round(actual, 3), "predicted_s": predicted, "shown_s": (session.prediction or {}).get("shown_s"),
                                          "error_s": round(actual - predicted, 3) if predicted is not None else None,
                                          "phase1_seconds": round(session.phase1_duration.total_seconds(), 3) if session.phase1_duration else None,
                                          "learned": learned})


RECOVERY_ATTEMPTS = 3  # switches left open for the watchdog when the replica cannot be brought back


def _recover_replica(run, session, hv, exc):
    """A switch that fails must never leave both VMs down: production off, replica back on."""
    current = FailbackSession.objects.get(pk=session.pk)
    if current.status != SessionStatus.SWITCHING:  # another run of this step finished it: leave its VMs alone
        _note(current, "phase2", f"A second run of phase 2 stopped ({exc}); failback #{session.pk} is already {current.get_status_display()}: nothing undone",
              outcome=Outcome.INFO, data={"error": str(exc)}, run=run)
        return
    steps = []
    if session.production_vm_id:  # on its own: a production VM that is gone or stuck must not keep the replica down
        try:
            if hv.power_state(session.production_vm_id) == POWERED_ON:
                hv.power_off(session.production_vm_id)
                steps.append("production VM powered off")
        except LeaseLost:
            raise
        except Exception as again:
            steps.append(f"production VM {session.vm_name} not checked: {again}")
    reason, ending = _reason(session, exc), "the replica runs the workload again"
    try:
        if hv.power_state(session.replica.vm_id) != POWERED_ON:
            hv.power_on(session.replica.vm_id)
            steps.append("replica powered on")
    except LeaseLost:
        raise
    except Exception as again:
        steps.append(f"replica not powered on: {again}")
        # The platform cannot be reached or refuses: the replica may be down. Ending the session now
        # would leave both VMs off, so it stays Switching and the watchdog runs phase 2 again after
        # FAILBACK_STALL_SECONDS: the switch then finishes, or fails with the replica brought back.
        tried = AuditEvent.objects.filter(session_id=session.pk, action="recover_replica").count()
        if tried < RECOVERY_ATTEMPTS:
            _note(session, "recover_replica", f"Switch failed: {reason}. The replica {session.replica.name} could not be powered back on: {again}. "
                  f"The switch stays open; the watchdog tries again in about {settings.FAILBACK_STALL_SECONDS} s (attempt {tried + 1} of {RECOVERY_ATTEMPTS}).",
                  outcome=Outcome.FAILED, data={"error": reason, "original": str(exc), "type": type(exc).__name__, "recovery": steps}, run=run)
            return
        ending = f"the replica {session.replica.name} could NOT be powered on after {RECOVERY_ATTEMPTS} attempts: power it on by hand"
    workflow.transition(session.pk, "fail_switch", lease=run.token, error=f"{type(exc).__name__}: {reason}",
                        detail=f"Switch failed: {reason}. {'; '.join(steps) or 'replica still running'}; {ending}.",
                        data={"error": reason, "original": str(exc), "type": type(exc).__name__, "recovery": steps})


# -- finalising --------------------------------------------------------------------------------

def run_commit(session_id):
    with superseded(session_id, "commit"):
        _run_commit(session_id)


def _run_commit(session_id):
    session, run = _take(session_id, SessionStatus.COMMITTING, "commit", "Commit step not run")
    if run is None:
        return
    old_source = session.replica.production_vm_id or session.replica.source_name

    def then(s):
        Replica.objects.filter(pk=s.replica_id).update(production_vm_id=s.production_vm_id, source_name=s.vm_name)

    workflow.transition(session.pk, "finish_commit", then=then, lease=run.token,
                        detail=f"Production VM {session.vm_name} replaces {old_source} as the protected workload; the replica returns to normal replication",
                        data={"production_vm_id": session.production_vm_id, "previous_source": old_source})
    _drop_state(session.pk)


UNDO_ATTEMPTS = 3  # runs of the undo step (the first and the watchdog's) before it ends with "act by hand"


def run_undo(session_id):
    with superseded(session_id, "undo"):
        session, run = _take(session_id, SessionStatus.UNDOING, "undo", "Undo step not run")
        if run is None:
            return
        with run.beating(), closing(hypervisor_for(session.replica)) as platform:
            _undo(run, session, run.hypervisor(platform))


def _undo(run, session, hv):
    """Back to the replica. The replica coming back on is what matters: a production VM that is gone,
    or not this failback's, never stops it. Production goes off first (its changes are discarded), so
    the two never serve at once; a production VM the platform cannot power off keeps the workload up,
    so the step fails and is tried again, at most UNDO_ATTEMPTS times."""
    steps = []
    try:
        vm_id, why_not = owned_vm(session, hv)
        if vm_id is None:
            steps.append(f"production VM not touched: {why_not}")
        elif hv.power_state(vm_id) != POWERED_OFF:
            hv.power_off(vm_id)
            steps.append("production VM powered off")
        if hv.power_state(session.replica.vm_id) != POWERED_ON:
            hv.power_on(session.replica.vm_id)
            steps.append("replica powered on")
        if vm_id is not None:
            hv.delete_vm(vm_id)
            steps.append(f"production VM {session.vm_name} deleted (its changes since the switch are discarded)")
    except LeaseLost:
        raise
    except Exception as exc:
        tried = AuditEvent.objects.filter(session_id=session.pk, action="undo", outcome=Outcome.FAILED).count() + 1
        done = "; ".join(steps) or "nothing"
        if tried < UNDO_ATTEMPTS:
            _note(session, "undo", f"Undo could not complete: {exc} (done so far: {done}). The watchdog tries again in about "
                  f"{settings.FAILBACK_STALL_SECONDS} s (attempt {tried} of {UNDO_ATTEMPTS}).", outcome=Outcome.FAILED,
                  data={"error": str(exc), "steps": steps, "attempt": tried}, run=run)
            return  # still Undoing: the watchdog queues the step again once its heartbeat is old
        replica_on = "replica powered on" in steps or _powered_on(hv, session.replica.vm_id)
        by_hand = ("the replica runs; check the production VM by hand" if replica_on else
                   f"the replica {session.replica.name} is NOT running: power it on by hand")
        workflow.transition(session.pk, "fail_undo", lease=run.token, error=f"{type(exc).__name__}: {exc}",
                            detail=f"Undo failed after {UNDO_ATTEMPTS} attempts: {exc} (done: {done}); {by_hand}.",
                            data={"error": str(exc), "steps": steps, "attempts": UNDO_ATTEMPTS, "replica_on": replica_on})
        return
    workflow.transition(session.pk, "finish_undo", lease=run.token, detail="; ".join(steps).capitalize(), data={"steps": steps})
    _drop_state(session.pk)


def _powered_on(hv, vm_id):
    try:
        return hv.power_state(vm_id) == POWERED_ON
    except Exception:
        return False


# -- cancel ------------------------------------------------------------------------------------

def run_cancel(session_id):
    with superseded(session_id, "cancel"):
        _run_cancel(session_id)


def _run_cancel(session_id):
    """Finish a cancel once the copy has let go: keep or delete the production VM. Never touches the replica."""
    session, run = _take(session_id, SessionStatus.CANCELLING, "cancel", "Cancel step not run")
    if run is None:
        return
    with run.beating(), session_lock(session.pk), closing(hypervisor_for(session.replica)) as platform:
        run.check()
        hv = run.hypervisor(platform)
        session.refresh_from_db()
        replica_power = hv.power_state(session.replica.vm_id)
        if not session.production_vm_id:
            detail = "Nothing had been built yet"
        elif session.keep_production_vm:
            if hv.power_state(session.production_vm_id) != POWERED_OFF:
                hv.power_off(session.production_vm_id)
            detail = (f"Production VM {session.vm_name} kept, powered off, with its copy map: a new failback of {session.replica.name} "
                      f"to {session.vm_name} on {session.target_host}/{session.target_datastore} sends only what differs")
        else:
            _discard_production_vm(session, hv, run)
            _drop_state(session.pk)
            detail = f"Half-built production VM {session.vm_name} deleted"
    workflow.transition(session.pk, "finish_cancel", lease=run.token, detail=f"{detail}. The replica was not touched and is {replica_power}.",
                        data={"kept_vm_id": session.production_vm_id if session.keep_production_vm else None, "replica_power": replica_power})


# -- ready to switch: catch-up syncs and the predicted window ------------------------------------

def _catch_up(run, session, hv):
    """Bring the production disks up to date while the replica runs, so the final delta stays small."""
    cancel = threading.Event()
    written, report = {}, []
    for disk in session.disks.all():
        if _network(hv):
            return None  # network transport resends whole disks: a catch-up would not shrink the window
        src, dst = hv.disk_path(session.replica.vm_id, disk.key), hv.disk_path(session.production_vm_id, disk.key)
        new_id = hv.change_tracking(session.replica.vm_id, disk.key) if disk.change_id else None
        extents = list(hv.changed_areas(session.replica.vm_id, disk.key, disk.change_id).extents) if new_id else None
        sink = ProgressSink(disk, expect=SessionStatus.READY_TO_SWITCH, cancel=cancel, run=run, show=False)
        try:
            result = delta_copy(src, dst, state_dir=_state_dir(session.pk, disk.key), changed_extents=extents, progress=sink,
                                progress_interval=settings.FAILBACK_PROGRESS_INTERVAL, cancel=run.fence(cancel))
        except TransferCancelled:
            run.check()  # a switch that took the lease: stop here, silently
            return None  # a cancel: the copy map is consistent, the next pass carries on
        _save(disk, run, change_id=new_id or "")
        written[disk.key] = result.bytes_written
        report.append(f"{disk.key}: {_mib(result.bytes_written)} ({'tracked' if new_id else 'digest'})")
    _save(session, run, catchup_at=timezone.now(), prediction={**(session.prediction or {}), "catchup_written": written})
    _note(session, "catch_up", f"Catch-up sync while the replica runs: {', '.join(report)}", outcome=Outcome.INFO,
          data={"bytes_written": written}, run=run)
    return written


def _refresh_readiness(session, hv):
    """Predict the window of a switch started now and re-run the switch checks; shown beside the buttons."""
    forecast = prediction.predict(hv, session)
    found = prechecks.before_switch(hv, session)
    FailbackSession.objects.filter(pk=session.pk, status=SessionStatus.READY_TO_SWITCH).update(
        predicted_window_s=forecast["window_s"],
        prediction={**(session.prediction or {}), "now": forecast, "checks": [c.as_dict() for c in found], "checked_at": timezone.now().isoformat()})
    broadcast.send_now(session.pk)
    return forecast


def run_readiness(session_id, *, catch_up=None):
    """Scheduled every minute per Ready-to-switch session: a catch-up when one is due, then a fresh prediction."""
    with superseded(session_id, "catch-up"):
        return _run_readiness(session_id, catch_up)


def _run_readiness(session_id, catch_up):
    session = FailbackSession.objects.select_related("replica").get(pk=session_id)
    if session.status != SessionStatus.READY_TO_SWITCH:
        return None
    with session_lock(session.pk, wait=False) as mine:
        if not mine:
            return None  # a switch, a cancel or another catch-up holds the disks
        run = Run.take(session_id, SessionStatus.READY_TO_SWITCH)  # taken under the lock: a switch that starts later fences it
        if run is None:
            return None
        with run.beating(), closing(hypervisor_for(session.replica)) as platform:
            hv = run.hypervisor(platform)
            last = session.catchup_at or session.phase1_ended_at
            due = last is None or timezone.now() - last >= timedelta(minutes=settings.FAILBACK_CATCHUP_MINUTES)
            if catch_up if catch_up is not None else due:
                _catch_up(run, session, hv)
                session.refresh_from_db()
            if session.status != SessionStatus.READY_TO_SWITCH:
                return None
            return _refresh_readiness(session, hv)


# -- plans -------------------------------------------------------------------------------------

def run_plan_switch(plan_id):
    """Phase 2 of a plan's members, in boot order, with the plan's delay between power-ons."""
    from . import plans
    from .models import FailbackPlan

    plan = FailbackPlan.objects.get(pk=plan_id)
    members = list(plan.sessions.filter(status=SessionStatus.SWITCHING).order_by("plan_order", "pk").values_list("pk", flat=True))
    pending = list(members)
    stop = threading.Event()

    def keep_waiting_members_alive():  # so the watchdog does not start them out of order
        while not stop.wait(5):
            FailbackSession.objects.filter(pk__in=list(pending)).update(heartbeat_at=timezone.now())
        connection.close()

    beater = threading.Thread(target=keep_waiting_members_alive, daemon=True)
    beater.start()
    try:
        for i, session_id in enumerate(members):
            if i and plan.power_on_delay_s:
                plans.wait_between_power_ons(plan, pending)
            pending.remove(session_id)
            run_switch(session_id)
    finally:
        stop.set()
        beater.join()
