"""The long-running steps of a failback, run by django-q2 workers (see tasks.py).

Each step talks to the platform only through the hypervisor interface and to the disks only
through the transfer engine, and changes state only through ``workflow.transition``. What every
step did, with its figures, goes to the audit trail.
"""

import hashlib
import logging
import shutil
import threading
import time
from contextlib import closing

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from . import broadcast, workflow
from .choices import Outcome, SessionStatus
from .hypervisors.base import POWERED_OFF, POWERED_ON, SUSPENDED
from .hypervisors.registry import hypervisor_for
from .models import FailbackSession, Replica, SessionDisk
from .transfer import delta_copy, disk_digest, full_copy, verify_target

log = logging.getLogger(__name__)


def _state_dir(session_id, disk_key):
    path = settings.FAILBACK_STATE_DIR / str(session_id) / disk_key.replace(":", "_").replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _note(session, action, detail, *, outcome=Outcome.OK, data=None):
    with transaction.atomic():
        workflow.audit(action=action, outcome=outcome, session=session, from_state=session.status, to_state=session.status, detail=detail, data=data)
        broadcast.session_changed(session.pk)


def _save(obj, **fields):
    for name, value in fields.items():
        setattr(obj, name, value)
    obj.save(update_fields=list(fields))


SAMPLE_EVERY = 1.0  # seconds between throughput samples kept for the chart
MAX_SAMPLES = 2000


class ProgressSink:
    """Receives the engine's (already rate-bounded) progress; saves the fields it changes and nudges."""

    def __init__(self, disk):
        self.disk = disk
        self.samples = list(FailbackSession.objects.filter(pk=disk.session_id).values_list("throughput", flat=True).first() or [])
        self.last_sample = 0.0

    def __call__(self, p):
        _save(self.disk, bytes_total=p.bytes_total, bytes_done=p.bytes_done, bytes_written=p.bytes_written, rate_bps=p.rate_bps, eta_s=p.eta_seconds)
        fields = {"heartbeat_at": timezone.now()}
        now = time.time()
        if now - self.last_sample >= SAMPLE_EVERY:
            self.last_sample = now
            self.samples = (self.samples + [[round(now, 1), round(p.rate_bps), self.disk.phase]])[-MAX_SAMPLES:]
            fields["throughput"] = self.samples
        FailbackSession.objects.filter(pk=self.disk.session_id).update(**fields)
        broadcast.send_now(self.disk.session_id)


def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


# -- phase 1 -----------------------------------------------------------------------------------

def _beat(session_id, *_):
    FailbackSession.objects.filter(pk=session_id).update(heartbeat_at=timezone.now())


def run_phase1(session_id, resume=False):
    if resume:  # the watchdog found phase 1 without a worker: carry on from the checkpoints
        session = FailbackSession.objects.select_related("replica").get(pk=session_id)
        if session.status != SessionStatus.PHASE1:
            _note(session, "resume", f"Phase 1 not resumed: failback #{session.pk} is {session.get_status_display()}", outcome=Outcome.INFO)
            return
    else:
        try:
            session = workflow.transition(session_id, "begin_phase1", phase1_started_at=timezone.now(), heartbeat_at=timezone.now())
        except workflow.Refused:
            return  # delivered twice or cancelled meanwhile: the refusal is in the audit trail
    with closing(hypervisor_for(session.replica)) as hv:
        _phase1(session, hv)
    workflow.after_phase1(session.pk)


def _phase1(session, hv):
    replica = session.replica
    try:
        if not session.production_vm_id:
            vm_id = hv.create_vm_like(replica.vm_id, name=session.vm_name, host=session.target_host,
                                      datastore=session.target_datastore, network_map=session.network_map,
                                      resource_pool=session.resource_pool or None, folder=session.folder or None)
            _save(session, production_vm_id=vm_id)
            _note(session, "create_production_vm", f"Created production VM {session.vm_name} ({vm_id}) on {session.target_host}/{session.target_datastore} like {replica.name}",
                  data={"vm_id": vm_id})
        limit = session.bandwidth_mbps * 1_000_000 if session.bandwidth_mbps else None
        for disk in session.disks.all():
            # On a resume the first change id stays: it covers every write since the copy began.
            change_id = disk.change_id or hv.change_tracking(replica.vm_id, disk.key) or ""
            if _network(hv):
                _network_copy(hv, session, disk, phase=1)
                continue
            _save(disk, phase=1, method="full", change_id=change_id, eta_s=None,
                  method_reason="Phase 1 copies every allocated block; holes and zero blocks are skipped")
            result = full_copy(hv.disk_path(replica.vm_id, disk.key), hv.disk_path(session.production_vm_id, disk.key),
                               state_dir=_state_dir(session.pk, disk.key), progress=ProgressSink(disk),
                               progress_interval=settings.FAILBACK_PROGRESS_INTERVAL, bandwidth_limit_bps=limit)
            _save(disk, bytes_total=result.bytes_total, bytes_done=result.bytes_total, bytes_written=result.bytes_written,
                  phase1_bytes_written=result.bytes_written, phase1_digest=result.digest, eta_s=0)
            _note(session, "copy_disk", f"Disk {disk.key}: {_mib(result.bytes_read)} read, {_mib(result.bytes_written)} written in {result.seconds:.1f} s (full copy)",
                  data={"disk": disk.key, "method": "full", "bytes_read": result.bytes_read, "bytes_written": result.bytes_written,
                        "zero_bytes_skipped": result.zero_bytes_skipped, "seconds": round(result.seconds, 3), "digest": result.digest,
                        "resumed_from": result.resumed_from, "change_id": change_id})
        workflow.transition(session.pk, "finish_phase1", phase1_ended_at=timezone.now(),
                            detail="Production VM holds the replica's data as of now; the replica keeps running")
    except Exception as exc:
        log.exception("phase 1 of session %s failed", session.pk)
        _discard_production_vm(session, hv)
        workflow.transition(session.pk, "fail_phase1", error=f"{type(exc).__name__}: {exc}",
                            detail=f"Phase 1 failed: {exc}. The replica is untouched and still running in Failover.",
                            data={"error": str(exc), "type": type(exc).__name__})
        _drop_state(session.pk)
        return False
    return True


def _network(hv):
    return getattr(hv, "transport", "direct") == "network"


def _network_digest(hv, vm_id, disk_key, capacity, chunk=8 << 20):
    digest = hashlib.sha256()
    for offset in range(0, capacity, chunk):
        digest.update(hv.download_range(vm_id, disk_key, offset, min(chunk, capacity - offset)))
    return f"sha256:{digest.hexdigest()}"


def _network_copy(hv, session, disk, *, phase):
    """Network transport: the datastore HTTP interface reads ranges but writes whole files only, so
    both phases stream the whole disk (a GET piped into a PUT). Phase 2 verifies by reading both disks
    back over HTTP and comparing SHA-256 digests."""
    replica = session.replica
    why = ("Network transport: the whole disk is streamed through the datastore HTTP interface (GET piped into PUT)" if phase == 1 else
           "Network transport cannot write ranges: the whole disk is sent again while the replica is off")
    _save(disk, phase=phase, method="full", method_reason=why, bytes_total=disk.capacity_bytes, bytes_done=0, bytes_written=0, eta_s=None)
    broadcast.send_now(session.pk)
    started = time.monotonic()
    sent = hv.copy_disk_network(replica.vm_id, session.production_vm_id, disk.key)
    seconds = time.monotonic() - started
    fields = {"bytes_done": disk.capacity_bytes, "bytes_written": sent, "rate_bps": sent / seconds if seconds else 0, "eta_s": 0}
    data = {"disk": disk.key, "method": "full", "transport": "network", "why": why, "bytes_written": sent, "seconds": round(seconds, 3)}
    if phase == 1:
        _save(disk, phase1_bytes_written=sent, **fields)
        _note(session, "copy_disk", f"Disk {disk.key}: {_mib(sent)} sent over the network in {seconds:.1f} s (full copy)", data=data)
        return
    source_digest = _network_digest(hv, replica.vm_id, disk.key, disk.capacity_bytes)
    target_digest = _network_digest(hv, session.production_vm_id, disk.key, disk.capacity_bytes)
    verified = source_digest == target_digest
    _save(disk, phase2_bytes_written=sent, source_digest=source_digest, target_digest=target_digest, verified=verified, **fields)
    data.update(source_digest=source_digest, target_digest=target_digest)
    if not verified:
        raise RuntimeError(f"Disk {disk.key} differs after the final copy: replica {source_digest}, production {target_digest}")
    _note(session, "send_changes", f"Disk {disk.key}: {_mib(sent)} sent over the network (whole disk); production disk verified identical", data=data)


def _discard_production_vm(session, hv):
    if not session.production_vm_id:
        return
    try:
        if hv.power_state(session.production_vm_id) != POWERED_OFF:
            hv.power_off(session.production_vm_id)
        hv.delete_vm(session.production_vm_id)
        _note(session, "delete_production_vm", f"Discarded the half-built production VM {session.vm_name}")
    except Exception as exc:
        _note(session, "delete_production_vm", f"Could not discard production VM {session.vm_name}: {exc}", outcome=Outcome.FAILED, data={"error": str(exc)})


def _drop_state(session_id):
    shutil.rmtree(settings.FAILBACK_STATE_DIR / str(session_id), ignore_errors=True)


# -- phase 2 -----------------------------------------------------------------------------------

def _stop_replica(session, hv):
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
    hv.shutdown_guest(vm)
    deadline = time.monotonic() + session.shutdown_timeout_s
    pause = min(0.5, session.shutdown_timeout_s / 10)
    while time.monotonic() < deadline:
        if hv.power_state(vm) == POWERED_OFF:
            return "Guest OS shut down"
        _beat(session.pk)
        time.sleep(pause)
    hv.power_off(vm)
    return f"Guest OS did not shut down within {session.shutdown_timeout_s} s: powered off"


def run_switch(session_id):
    session = FailbackSession.objects.select_related("replica").get(pk=session_id)
    if session.status != SessionStatus.SWITCHING:
        _note(session, "phase2", f"Phase 2 not run: failback #{session.pk} is {session.get_status_display()}", outcome=Outcome.INFO)
        return
    with closing(hypervisor_for(session.replica)) as hv:
        _switch(session, hv)


def _switch(session, hv):
    replica = session.replica
    try:
        if session.replica_off_at is None:  # on a resume after the replica went off, it stays off
            if session.replica_stop_started_at is None:
                _save(session, replica_stop_started_at=timezone.now())
            how = _stop_replica(session, hv)
            _save(session, replica_off_at=timezone.now(), stop_method=how, heartbeat_at=timezone.now())
            _note(session, "stop_replica", how)
        for disk in session.disks.all():
            if _network(hv):
                _network_copy(hv, session, disk, phase=2)
                continue
            src, dst = hv.disk_path(replica.vm_id, disk.key), hv.disk_path(session.production_vm_id, disk.key)
            extents = None
            if disk.change_id:
                areas = hv.changed_areas(replica.vm_id, disk.key, disk.change_id)
                extents = list(areas.extents)
                method, why = "tracked", f"Change tracking: {len(extents)} extents ({_mib(sum(n for _, n in extents))}) changed since phase 1 began"
            else:
                method, why = "digest", "Change tracking unavailable on this VM: reading the replica once and comparing block digests"
            _save(disk, phase=2, method=method, method_reason=why, bytes_done=0, bytes_total=0, bytes_written=0, eta_s=None)
            result = delta_copy(src, dst, state_dir=_state_dir(session.pk, disk.key), changed_extents=extents,
                                progress=ProgressSink(disk), progress_interval=settings.FAILBACK_PROGRESS_INTERVAL)
            beat = lambda *_: _beat(session.pk)  # noqa: E731  reading whole disks can take a while
            source_digest = disk_digest(src, progress=beat, progress_interval=5)
            target_digest = verify_target(dst, state_dir=_state_dir(session.pk, disk.key), progress=beat, progress_interval=5)
            verified = source_digest == target_digest == result.digest
            _save(disk, bytes_total=result.bytes_total, bytes_done=result.bytes_total, bytes_written=result.bytes_written, eta_s=0,
                  phase2_bytes_written=result.bytes_written, source_digest=source_digest, target_digest=target_digest, verified=verified)
            data = {"disk": disk.key, "method": method, "why": why, "bytes_read": result.bytes_read, "bytes_written": result.bytes_written,
                    "seconds": round(result.seconds, 3), "source_digest": source_digest, "target_digest": target_digest}
            if not verified:
                raise RuntimeError(f"Disk {disk.key} differs after the final delta: replica {source_digest}, production {target_digest}")
            _note(session, "send_changes", f"Disk {disk.key}: {_mib(result.bytes_written)} of changes sent ({method}); production disk verified identical", data=data)
        session = workflow.transition(session.pk, "finish_switch", phase2_ended_at=timezone.now(), detail="The workload now belongs to the production VM")
    except Exception as exc:
        log.exception("phase 2 of session %s failed", session.pk)
        _recover_replica(session, hv, exc)
        return
    if session.power_on_after:
        try:
            hv.power_on(session.production_vm_id)
            _save(session, production_on_at=timezone.now())
            _note(session, "power_on_production", f"Powered on production VM {session.vm_name}")
        except Exception as exc:
            _note(session, "power_on_production", f"Could not power on production VM {session.vm_name}: {exc}", outcome=Outcome.FAILED, data={"error": str(exc)})
    window = session.switch_window
    if window is not None:
        _note(session, "switch_window", f"Switch window {window.total_seconds():.1f} s (replica going down → production {'on' if session.production_on_at else 'ready'})",
              outcome=Outcome.INFO, data={"seconds": round(window.total_seconds(), 3), "phase1_seconds": round(session.phase1_duration.total_seconds(), 3) if session.phase1_duration else None})


def _recover_replica(session, hv, exc):
    """A switch that fails must never leave both VMs down: production off, replica back on."""
    steps = []
    try:
        if session.production_vm_id and hv.power_state(session.production_vm_id) == POWERED_ON:
            hv.power_off(session.production_vm_id)
            steps.append("production VM powered off")
        if hv.power_state(session.replica.vm_id) != POWERED_ON:
            hv.power_on(session.replica.vm_id)
            steps.append("replica powered on")
    except Exception as again:
        steps.append(f"recovery failed: {again}")
    workflow.transition(session.pk, "fail_switch", error=f"{type(exc).__name__}: {exc}",
                        detail=f"Switch failed: {exc}. {'; '.join(steps) or 'replica still running'}; the replica runs the workload again.",
                        data={"error": str(exc), "type": type(exc).__name__, "recovery": steps})


# -- finalising --------------------------------------------------------------------------------

def run_commit(session_id):
    session = FailbackSession.objects.select_related("replica").get(pk=session_id)
    if session.status != SessionStatus.COMMITTING:
        _note(session, "commit", f"Commit step not run: failback #{session.pk} is {session.get_status_display()}", outcome=Outcome.INFO)
        return
    old_source = session.replica.production_vm_id or session.replica.source_name

    def then(s):
        Replica.objects.filter(pk=s.replica_id).update(production_vm_id=s.production_vm_id, source_name=s.vm_name)

    workflow.transition(session.pk, "finish_commit", then=then,
                        detail=f"Production VM {session.vm_name} replaces {old_source} as the protected workload; the replica returns to normal replication",
                        data={"production_vm_id": session.production_vm_id, "previous_source": old_source})
    _drop_state(session.pk)


def run_undo(session_id):
    session = FailbackSession.objects.select_related("replica").get(pk=session_id)
    if session.status != SessionStatus.UNDOING:
        _note(session, "undo", f"Undo step not run: failback #{session.pk} is {session.get_status_display()}", outcome=Outcome.INFO)
        return
    with closing(hypervisor_for(session.replica)) as hv:
        _undo(session, hv)


def _undo(session, hv):
    steps = []
    try:
        if session.production_vm_id:
            if hv.power_state(session.production_vm_id) != POWERED_OFF:
                hv.power_off(session.production_vm_id)
                steps.append("production VM powered off")
        if hv.power_state(session.replica.vm_id) != POWERED_ON:
            hv.power_on(session.replica.vm_id)
            steps.append("replica powered on")
        if session.production_vm_id:
            hv.delete_vm(session.production_vm_id)
            steps.append(f"production VM {session.vm_name} deleted (its changes since the switch are discarded)")
    except Exception as exc:
        _note(session, "undo", f"Undo could not complete: {exc} (done so far: {'; '.join(steps) or 'nothing'})", outcome=Outcome.FAILED,
              data={"error": str(exc), "steps": steps})
        raise
    workflow.transition(session.pk, "finish_undo", detail="; ".join(steps).capitalize(), data={"steps": steps})
    _drop_state(session.pk)


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
