"""Phase 1: build the production VM and copy every disk while the replica keeps running."""

import logging
import os
import shutil
import threading
from contextlib import closing

from django.conf import settings
from django.utils import timezone

from .. import automatic, broadcast, logging_context, prediction, workflow
from ..choices import Outcome, SessionStatus
from ..hypervisors.registry import hypervisor_for
from ..models import FailbackSession
from ..transfer import TransferCancelled, delta_copy, full_copy
from ..transfer.blockio import opened
from ..transfer.progress import paused
from ..transfer.sparse import allocated_bytes
from .finish import _discard_production_vm
from .hooking import run_hooks
from .nbd import disk_ends, with_restarts
from .network import _network, _network_copy
from .progress import ProgressSink
from .readiness import _refresh_readiness
from .runs import LeaseLost, Run, _drop_state, _note, _reason, _save, _size, _state_dir, _take, session_lock, superseded

log = logging.getLogger(__name__)


@logging_context.step("phase1")
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
            session = workflow.transition(
                session_id,
                "begin_phase1",
                lease=run.token if run else None,
                phase1_started_at=timezone.now(),
                heartbeat_at=timezone.now(),
            )
        except workflow.Refused:
            return  # delivered twice or cancelled meanwhile: the refusal is in the audit trail
    with run.beating(), session_lock(session.pk), closing(hypervisor_for(session.replica)) as platform:
        run.check()  # the lock may have been held by an earlier run that was paused, not dead
        hv = run.hypervisor(platform)
        if _phase1(run, session, hv):
            _refresh_readiness(FailbackSession.objects.select_related("replica").get(pk=session.pk), hv)
    automatic.after_phase1(session.pk)


def _phase1(run, session, hv):
    """Create the production VM, state each disk's method, copy the disks, finish; True when it did.
    A cancel stops it with the checkpoints kept; any other error discards what it built."""
    cancel = threading.Event()
    try:
        run_hooks(run, session, "before_phase1")  # nothing built yet: a failing hook fails phase 1 here
        _create_production_vm(run, session, hv)
        disks = list(session.disks.all())
        copies = _copy_disks(run, session, hv, disks, cancel)
        _finish_phase1(run, session, copies)
    except LeaseLost:
        raise
    except (TransferCancelled, workflow.Refused):
        # Cancelled during the copy, or just after it (finish_phase1 refused: the session is Cancelling): the
        # cancel step decides what happens to the production VM, so phase 1 must not discard it.
        run.check()  # a lost lease stops here, silently; a cancel is noted
        _note(
            session,
            "phase1",
            "Phase 1 stopped: the failback is being cancelled; the copy checkpoint is kept until the cancel step decides",
            outcome=Outcome.INFO,
            run=run,
        )
        return False
    except Exception as exc:
        log.exception("phase 1 of session %s failed", session.pk)
        run.check()
        _fail_phase1(run, session, hv, exc)
        return False
    return True


def _copy_disks(run, session, hv, disks, cancel):
    """Every disk's copy (a prediction.Copy each, in disk order); in nbd mode a server that goes away
    mid-copy is started again and the copy resumes (jobs/nbd.py, with_restarts)."""
    copies = {}

    def step(attempt):
        with disk_ends(hv, session, [] if _network(hv) else disks) as ends:
            if attempt == 1:
                _announce_phase1(run, session, hv, disks, ends)
            for disk in disks:
                if disk.key not in copies:
                    copies[disk.key] = _copy_disk(run, session, hv, disk, cancel, ends)
        return [copies[d.key] for d in disks]

    return with_restarts(run, session, step)


def _create_production_vm(run, session, hv):
    """The empty production VM, like the replica, where the admin placed it; on a resume it exists already."""
    if session.production_vm_id:
        return
    replica = session.replica
    vm_id = hv.create_vm_like(
        replica.vm_id,
        name=session.vm_name,
        host=session.target_host,
        datastore=session.target_datastore,
        network_map=session.network_map,
        resource_pool=session.resource_pool or None,
        folder=session.folder or None,
        owner_tag=session.owner_tag or None,
    )
    _save(session, run, production_vm_id=vm_id)
    _note(
        session,
        "create_production_vm",
        f"Created production VM {session.vm_name} ({vm_id}) on {session.target_host}/{session.target_datastore} like {replica.name}",
        data={"vm_id": vm_id, "owner_tag": session.owner_tag},
        run=run,
    )


def _reusable_state(session, disk):
    """A retry of a cancelled failback that kept its VM: the copy map of what that VM's disk holds."""
    if not session.reused_from_id:
        return False
    old = settings.FAILBACK_STATE_DIR / str(session.reused_from_id) / disk.key.replace(":", "_").replace("/", "_")
    new = _state_dir(session.pk, disk.key)
    if old.is_dir() and not os.listdir(new):
        shutil.copytree(old, new, dirs_exist_ok=True)
    return bool(os.listdir(new))


def _announce_phase1(run, session, hv, disks, ends):
    """Say, before any byte moves, which method each disk uses and why, and how much it holds."""
    for disk in disks:
        if _network(hv) or disk.method:  # network copies state their own; on a resume the method is already stated
            continue
        with opened(ends[disk.key][0], os.O_RDONLY) as source:  # a file, or an NBD export (block status)
            allocated = allocated_bytes(source, 0, disk.capacity_bytes)
        if _reusable_state(session, disk):
            method, why = (
                "digest",
                (
                    f"Retry: the production VM kept by failback #{session.reused_from_id} already holds most data; "
                    "block digests are compared and only blocks that differ are sent"
                ),
            )
        else:
            method, why = "full", "Phase 1 copies every allocated block; holes and zero blocks are skipped"
        _save(disk, run, phase=1, method=method, method_reason=why, bytes_total=allocated, bytes_done=0, eta_s=None)
    broadcast.send_now(session.pk)


def _limit_bps(session):
    """The session's bandwidth limit in bytes per second (``bandwidth_mbps`` is megabytes per second), or None."""
    return session.bandwidth_mbps * 1_000_000 if session.bandwidth_mbps else None


def _copy_disk(run, session, hv, disk, cancel, ends):
    """One disk of phase 1, resumable from its checkpoint: a prediction.Copy (what moved, how long it took,
    how long the bandwidth limit held it back)."""
    replica = session.replica
    disk.refresh_from_db()
    # On a resume the first change id stays: it covers every write since the copy began.
    change_id = disk.change_id or hv.change_tracking(replica.vm_id, disk.key) or ""
    if _network(hv):
        return _network_copy(run, hv, session, disk, phase=1, cancel=cancel)
    _save(disk, run, change_id=change_id)
    src, dst = ends[disk.key]
    limit = _limit_bps(session)
    sink = ProgressSink(disk, expect=SessionStatus.PHASE1, cancel=cancel, run=run)
    copy_args = {
        "state_dir": _state_dir(session.pk, disk.key),
        "progress": sink,
        "progress_interval": settings.FAILBACK_PROGRESS_INTERVAL,
        "bandwidth_limit_bps": limit,
        "cancel": run.fence(cancel),
    }
    with paused() as held:  # the limit's pauses, left out of the rates the switch is predicted from
        if disk.method == "digest":  # a retry onto the kept VM: only what differs
            result = delta_copy(src, dst, changed_extents=None, **copy_args)
        else:
            result = full_copy(src, dst, **copy_args)
    _save(
        disk,
        run,
        bytes_total=result.bytes_total,
        bytes_done=result.bytes_total,
        bytes_written=result.bytes_written,
        phase1_bytes_written=result.bytes_written,
        phase1_digest=result.digest,
        eta_s=0,
    )
    copy = prediction.Copy.of(result, held.seconds, sink.busy_s)
    _note_copy(run, session, disk, result, change_id, copy)
    return copy


def _note_copy(run, session, disk, result, change_id, copy):
    how = "only blocks that differ from the kept VM" if disk.method == "digest" else "full copy"
    _note(
        session,
        "copy_disk",
        f"Disk {disk.key}: {_size(result.bytes_read)} read, {_size(result.bytes_written)} written in {result.seconds:.1f} s ({how})",
        data={
            "disk": disk.key,
            "method": disk.method,
            "bytes_read": result.bytes_read,
            "bytes_written": result.bytes_written,
            "zero_bytes_skipped": result.zero_bytes_skipped,
            "seconds": round(result.seconds, 3),
            "limit_held_s": round(copy.held_s, 3),
            "working_s": round(copy.working_s, 3),
            "digest": result.digest,
            "resumed_from": result.resumed_from,
            "change_id": change_id,
            "reused_from": session.reused_from_id,
        },
        run=run,
    )


def _finish_phase1(run, session, copies):
    """Ready to switch, with the copy rates the window predictions start from."""
    base = prediction.phase1_rates(copies, limit_bps=_limit_bps(session)) if copies else {}
    workflow.transition(
        session.pk,
        "finish_phase1",
        lease=run.token,
        phase1_ended_at=timezone.now(),
        prediction={**(session.prediction or {}), "base": base},
        detail="Production VM holds the replica's data as of now; the replica keeps running",
    )


def _fail_phase1(run, session, hv, exc):
    """Discard what phase 1 built and say why it failed; the replica was never touched."""
    _discard_production_vm(session, hv, run)
    reason = _reason(session, exc)
    workflow.transition(
        session.pk,
        "fail_phase1",
        lease=run.token,
        error=f"{type(exc).__name__}: {reason}",
        detail=f"Phase 1 failed: {reason}. The replica is untouched and still running in Failover.",
        data={"error": reason, "original": str(exc), "type": type(exc).__name__},
    )
    _drop_state(session.pk)
