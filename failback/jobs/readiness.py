"""Ready to switch: catch-up syncs while the replica runs, and the predicted window beside the buttons."""

import threading
from contextlib import closing
from functools import partial

from django.conf import settings
from django.utils import timezone

from .. import broadcast, logging_context, prediction, windows
from .. import checks as prechecks
from ..choices import Outcome, SessionStatus
from ..hypervisors.base import HypervisorError
from ..hypervisors.registry import hypervisor_for
from ..models import FailbackSession
from ..transfer import TransferCancelled, delta_copy
from .disks import DiskWork, run_disks
from .nbd import disk_ends
from .network import _network
from .progress import ProgressSink
from .runs import Run, _note, _save, _size, _state_dir, session_lock, superseded


def _catch_up(run, session, hv):
    """Bring the production disks up to date while the replica runs, so the final delta stays small;
    up to FAILBACK_DISK_THREADS disks at once (jobs/disks.py), the platform asked here beforehand."""
    if _network(hv):
        return None  # network transport resends whole disks: a catch-up would not shrink the window
    report, methods = [], {}
    disks = list(session.disks.all())
    started = timezone.now()
    with disk_ends(hv, session, disks) as ends:
        written = _catch_up_disks(run, session, hv, disks, ends, report, methods)
    if written is None:
        return None
    report.sort()  # disks finish in any order; the row reads in disk order
    ended = timezone.now()
    previous = (session.prediction or {}).get("catchup") or {}
    # What the pass measured: the bytes found changed per disk since the previous pass began (or phase 1),
    # which gives a digest disk's write rate (windows.convergence); change tracking needs none of it.
    measured = {
        "since": previous.get("started_at") or (session.phase1_started_at or started).isoformat(),
        "started_at": started.isoformat(),
        "ended_at": ended.isoformat(),
        "written": written,
        "methods": methods,
    }
    _save(
        session,
        run,
        catchup_at=ended,
        prediction={**(session.prediction or {}), "catchup_written": written, "catchup": measured},
    )
    _note(
        session,
        "catch_up",
        f"Catch-up sync while the replica runs: {', '.join(report)}",
        outcome=Outcome.INFO,
        data={"bytes_written": written},
        run=run,
    )
    return written


def _catch_up_disks(run, session, hv, disks, ends, report, methods):
    """Each disk's catch-up delta on the pool: bytes written per disk (``methods``: tracked or digest), or
    None when cancelled."""
    cancel = threading.Event()
    written, items = {}, []
    for disk in disks:
        src, dst = ends[disk.key]
        new_id = hv.change_tracking(session.replica.vm_id, disk.key) if disk.change_id else None
        try:
            extents = (
                list(hv.changed_areas(session.replica.vm_id, disk.key, disk.change_id).extents) if new_id else None
            )
        except HypervisorError:  # the old id is refused (a reset): compare digests; new_id tracks from now on
            extents = None

        def done(result, disk=disk, new_id=new_id, extents=extents):
            _save(disk, run, change_id=new_id or "")
            written[disk.key] = result.bytes_written
            methods[disk.key] = "digest" if extents is None else "tracked"
            report.append(f"{disk.key}: {_size(result.bytes_written)} ({'digest' if extents is None else 'tracked'})")

        items.append(
            DiskWork(
                key=disk.key,
                work=partial(_delta, src, dst, _state_dir(session.pk, disk.key), extents),
                sink=ProgressSink(disk, expect=SessionStatus.READY_TO_SWITCH, cancel=cancel, run=run, show=False),
                done=done,
            )
        )
    try:
        run_disks(run, items, cancel)
    except TransferCancelled:
        run.check()  # a switch that took the lease: stop here, silently
        return None  # a cancel: the copy maps are consistent, the next pass carries on
    return written


def _delta(src, dst, state_dir, extents, progress, cancel):
    """In a worker thread (no database, no platform): one disk's catch-up delta."""
    return delta_copy(
        src,
        dst,
        state_dir=state_dir,
        changed_extents=extents,
        progress=progress,
        progress_interval=settings.FAILBACK_PROGRESS_INTERVAL,
        cancel=cancel,
    )


def _refresh_readiness(session, hv):
    """Predict the window of a switch started now and re-run the switch checks; shown beside the buttons."""
    forecast = prediction.predict(hv, session)
    found = prechecks.before_switch(hv, session)
    converging = windows.convergence(session, forecast, timezone.now())  # writes outpacing the copy
    FailbackSession.objects.filter(pk=session.pk, status=SessionStatus.READY_TO_SWITCH).update(
        predicted_window_s=forecast["window_s"],
        prediction={
            **(session.prediction or {}),
            "now": forecast,
            "checks": [c.as_dict() for c in found],
            "checked_at": timezone.now().isoformat(),
            "convergence": converging,
        },
    )
    windows.warn_convergence(session, converging)
    broadcast.send_now(session.pk)
    return forecast


@logging_context.step("readiness")
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
        run = Run.take(
            session_id, SessionStatus.READY_TO_SWITCH
        )  # taken under the lock: a switch that starts later fences it
        if run is None:
            return None
        with run.beating(), closing(hypervisor_for(session.replica)) as platform:
            hv = run.hypervisor(platform)
            last = session.catchup_at or session.phase1_ended_at
            due = last is None or timezone.now() - last >= windows.catchup_every(session, timezone.now())
            if catch_up if catch_up is not None else due:
                _catch_up(run, session, hv)
                session.refresh_from_db()
            if session.status != SessionStatus.READY_TO_SWITCH:
                return None
            return _refresh_readiness(session, hv)
