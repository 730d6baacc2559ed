"""Phase 2, the switch: the replica goes down, the last changes go across and are verified, and the
production VM takes the workload; a switch that fails brings the replica back."""

import logging
import threading
import time
from contextlib import closing
from functools import partial

from django.conf import settings
from django.utils import timezone

from .. import checks as prechecks
from .. import logging_context, prediction, windows, workflow
from ..choices import Outcome, SessionStatus
from ..hypervisors.base import POWERED_OFF, POWERED_ON, SUSPENDED, HypervisorError
from ..hypervisors.registry import hypervisor_for
from ..models import AuditEvent, FailbackSession, SessionDisk
from ..transfer import delta_copy, verify_changes
from .disks import DiskWork, run_disks
from .hooking import run_hooks
from .nbd import disk_ends, with_restarts
from .network import _network, _network_copy
from .progress import ProgressSink
from .runs import LeaseLost, Run, _beat, _note, _reason, _save, _size, _state_dir, _take, session_lock, superseded

log = logging.getLogger(__name__)

RECOVERY_ATTEMPTS = 3  # switches left open for the watchdog when the replica cannot be brought back


@logging_context.step("switch")
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


def _switch(run, session, hv):
    """Replica down, each disk's last changes sent and verified, production up, the window recorded.
    Any failure before the production VM owns the workload brings the replica back."""
    timing = {"delta_s": 0.0, "delta_bytes": 0, "verify_s": 0.0, "verify_bytes": 0}
    try:
        _replica_down(run, session, hv)
        _same_disks(hv, session)
        if _network(hv):  # one stream at a time: the datastore HTTP interface is the bottleneck
            for disk in session.disks.all():
                _network_copy(run, hv, session, disk, phase=2)
        else:
            _send_changes(run, session, hv, list(session.disks.all()), timing)
        session = workflow.transition(
            session.pk,
            "finish_switch",
            lease=run.token,
            phase2_ended_at=timezone.now(),
            heartbeat_at=timezone.now(),
            detail="The workload now belongs to the production VM",
            then=workflow.arm_commit_policy,
        )
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
    run_hooks(run, session, "after_switch")


class DisksChanged(Exception):
    """The replica's disks are no longer those the production VM was built with."""


def _same_disks(hv, session):
    """Checked again once the replica is off: the pre-switch check ran while its disks could still change,
    and a disk grown or added since would not be carried across."""
    changes = prechecks.disk_changes(hv, session)
    if changes:
        raise DisksChanged(
            f"since failback #{session.pk} started, {'; '.join(changes)}; the production VM was built with the "
            "disks as they were, so nothing was sent: start a new failback (another VM name, or delete this one first)"
        )


def _announce_phase2(run, session, hv):
    """Before the replica goes down: predict the window once more, and state each disk's method and why."""
    forecast = prediction.predict(hv, session)
    shown = session.predicted_window_s
    _save(
        session,
        run,
        prediction={**(session.prediction or {}), "at_switch": forecast, "shown_s": shown},
        predicted_window_s=forecast["window_s"],
    )
    for item in forecast["disks"]:
        SessionDisk.objects.filter(session=session, key=item["disk"]).update(
            phase=2,
            method=item["method"],
            method_reason=item["why"][:300],
            bytes_done=0,
            bytes_total=item["pending_bytes"],
            bytes_written=0,
            eta_s=None,
        )
    _note(
        session,
        "predict_window",
        f"Predicted switch window {forecast['window_s']:.1f} s: guest shutdown {forecast['shutdown_s']:.1f} s "
        f"({forecast['shutdown_basis']}), data {forecast['data_s']:.1f} s for {_size(forecast['changed_bytes'])} changed ({forecast['data_basis']}), "
        f"power-on {forecast['power_on_s']:.1f} s ({forecast['power_on_basis']})",
        outcome=Outcome.INFO,
        data=forecast,
        run=run,
    )


def _replica_down(run, session, hv):
    """The window opens: announced, then the replica stopped. On a resume after the replica went off, it stays off."""
    if session.replica_off_at is not None:
        return
    if session.replica_stop_started_at is None:
        run_hooks(run, session, "before_switch")  # the replica still runs: a failing hook stops the switch here
        _announce_phase2(run, session, hv)
        _save(session, run, replica_stop_started_at=timezone.now())
    how = _stop_replica(run, session, hv)
    _save(session, run, replica_off_at=timezone.now(), stop_method=how, heartbeat_at=timezone.now())
    _note(session, "stop_replica", how, run=run)


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
    try:
        hv.power_off(vm)
    except HypervisorError:
        # The guest may have finished its shutdown between the last look and the power-off, which the
        # platform then refuses ("already powered off"): that is the shutdown done, not a failed switch.
        if hv.power_state(vm) != POWERED_OFF:
            raise
        return f"Guest OS shut down at the {session.shutdown_timeout_s} s limit"
    return f"Guest OS did not shut down within {session.shutdown_timeout_s} s: powered off"


def _delta_method(hv, session, disk):
    """How the last changes of a disk are found: (method, why, extents); extents None means compare digests."""
    if not disk.change_id:
        return (
            "digest",
            "Change tracking unavailable on this VM: reading the replica once and comparing block digests",
            None,
        )
    try:
        extents = list(hv.changed_areas(session.replica.vm_id, disk.key, disk.change_id).extents)
    except HypervisorError as exc:  # e.g. change tracking reset on the replica since: its old ids are refused
        why = f"Change tracking cannot answer for the recorded change ID ({exc}): reading the replica once and comparing block digests"
        return "digest", why, None
    why = f"Change tracking: {len(extents)} extents ({_size(sum(n for _, n in extents))}) changed since phase 1 began"
    return "tracked", why, extents


def _send_changes(run, session, hv, disks, timing):
    """Each disk's final delta while the replica is off, then the proof that both disks are identical;
    up to FAILBACK_DISK_THREADS disks at once (jobs/disks.py). The platform is asked here, before the
    threads start; they run the engine only."""

    def step(attempt):  # in nbd mode, again with new servers if one went away (disks done are skipped)
        left = [d for d in disks if attempt == 1 or not d.verified]
        with disk_ends(hv, session, left) as ends:
            _send_each(run, session, hv, left, timing, ends)

    with_restarts(run, session, step)


def _send_each(run, session, hv, disks, timing, ends):
    stop = threading.Event()
    items = []
    for disk in disks:
        src, dst = ends[disk.key]
        method, why, extents = _delta_method(hv, session, disk)
        _save(
            disk,
            run,
            phase=2,
            method=method,
            method_reason=why,
            bytes_done=0,
            bytes_total=0,
            bytes_written=0,
            eta_s=None,
        )
        items.append(
            DiskWork(
                key=disk.key,
                work=partial(_final_delta, src, dst, _state_dir(session.pk, disk.key), extents),
                sink=ProgressSink(disk, expect=SessionStatus.SWITCHING, cancel=stop, run=run),
                done=partial(_changes_sent, run, session, disk, method, why, timing),
            )
        )
    started = time.monotonic()
    run_disks(run, items, stop)
    _overlap(timing, time.monotonic() - started)


def _final_delta(src, dst, state_dir, extents, progress, cancel):
    """In a worker thread (no database, no platform): one disk's final delta and its proof."""
    started_at = time.time()
    result = delta_copy(
        src,
        dst,
        state_dir=state_dir,
        changed_extents=extents,
        progress=progress,
        progress_interval=settings.FAILBACK_PROGRESS_INTERVAL,
        cancel=cancel,
        source_quiet=True,  # the replica is off
    )
    # The proof reads what changed, not the whole disks: both digests come from the leaves the
    # passes kept, the files' seals show nothing wrote to them since, and sampled grains are re-read.
    proof = verify_changes(src, dst, state_dir=state_dir, cancel=cancel)
    return result, proof, (started_at, time.time())


def _changes_sent(run, session, disk, method, why, timing, outcome):
    """Back in the step's thread as a disk finishes: its figures saved, its audit row written."""
    result, proof, span = outcome
    timing["delta_s"] += result.seconds
    timing["delta_bytes"] += max(result.bytes_read, result.bytes_written)
    timing["verify_s"] += proof.seconds
    timing["verify_bytes"] += proof.bytes_read
    verified = proof.identical and proof.target_digest == result.digest
    _save(
        disk,
        run,
        bytes_total=result.bytes_total,
        bytes_done=result.bytes_total,
        bytes_written=result.bytes_written,
        eta_s=0,
        phase2_bytes_written=result.bytes_written,
        source_digest=proof.source_digest,
        target_digest=proof.target_digest,
        verified=verified,
    )
    if not verified:
        raise RuntimeError(
            f"Disk {disk.key} differs after the final delta: replica {proof.source_digest}, production {proof.target_digest}"
        )
    _note(
        session,
        "send_changes",
        f"Disk {disk.key}: {_size(result.bytes_written)} of changes sent ({method}); production disk verified identical",
        data={**_changes_data(disk, method, why, result, proof), "started_at": span[0], "ended_at": span[1]},
        run=run,
    )


def _overlap(timing, wall_s):
    """Disks that ran side by side: the delta and verification seconds, summed over disks, are scaled to
    the wall time they took together, so the rates the next prediction learns are the VM's, not one disk's."""
    busy = timing["delta_s"] + timing["verify_s"]
    if busy > wall_s > 0:
        timing["delta_s"] *= wall_s / busy
        timing["verify_s"] *= wall_s / busy


def _changes_data(disk, method, why, result, proof):
    return {
        "disk": disk.key,
        "method": method,
        "why": why,
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "source_digest": proof.source_digest,
        "target_digest": proof.target_digest,
        "proof": {
            "source_sealed": proof.source_sealed,
            "target_sealed": proof.target_sealed,
            "sampled_grains": proof.sampled_grains,
            "bytes_read": proof.bytes_read,
            "seconds": round(proof.seconds, 3),
        },
        "production_untouched_since_last_pass": result.target_untouched,
    }


def _power_on_production(run, session, hv):
    try:
        if hv.power_state(session.production_vm_id) != POWERED_ON:
            hv.power_on(session.production_vm_id)
        _save(session, run, production_on_at=timezone.now())
        _note(session, "power_on_production", f"Powered on production VM {session.vm_name}", run=run)
    except LeaseLost:
        raise
    except Exception as exc:
        _note(
            session,
            "power_on_production",
            f"Could not power on production VM {session.vm_name}: {exc}",
            outcome=Outcome.FAILED,
            data={"error": str(exc)},
            run=run,
        )


@logging_context.step("power_on")
def run_power_on(session_id):
    """The watchdog found a switched session whose production VM was never powered on (worker lost)."""
    with superseded(session_id, "power on"):
        session = FailbackSession.objects.select_related("replica").get(pk=session_id)
        if session.status != SessionStatus.FAILBACK or session.production_on_at or not session.power_on_after:
            why = (
                f"failback #{session.pk} is {session.get_status_display()}"
                if session.status != SessionStatus.FAILBACK
                else "the production VM was powered on meanwhile"
                if session.production_on_at
                else "this failback leaves the production VM off"
            )
            _note(session, "power_on_production", f"Power-on not run: {why}", outcome=Outcome.INFO)
            return
        run = Run.take(session_id, SessionStatus.FAILBACK)
        if run is None:
            return
        with run.beating(), closing(hypervisor_for(session.replica)) as platform:
            _power_on_production(run, session, run.hypervisor(platform))
            run_hooks(run, session, "after_switch")


def _record_window(run, session, timing):
    window = session.switch_window
    if window is not None:
        actual = window.total_seconds()
        forecast = (session.prediction or {}).get("at_switch") or {}
        predicted = forecast.get("window_s")
        versus = f"; predicted {predicted:.1f} s ({actual - predicted:+.1f} s)" if predicted is not None else ""
        budget = windows.rules(session)[1]  # the downtime budget, beside predicted and actual (windows.py)
        versus += f"; budget {budget} s ({'within' if actual <= budget else 'over'})" if budget is not None else ""
        learned = prediction.learn(session, timing)
        _note(
            session,
            "switch_window",
            run=run,
            detail=f"Switch window {actual:.1f} s (replica going down → production {'on' if session.production_on_at else 'ready'}){versus}",
            outcome=Outcome.INFO,
            data={
                "seconds": round(actual, 3),
                "predicted_s": predicted,
                "budget_s": budget,
                "shown_s": (session.prediction or {}).get("shown_s"),
                "error_s": round(actual - predicted, 3) if predicted is not None else None,
                "phase1_seconds": round(session.phase1_duration.total_seconds(), 3)
                if session.phase1_duration
                else None,
                "learned": learned,
            },
        )


# -- a switch that failed ----------------------------------------------------------------------


def _recover_replica(run, session, hv, exc):
    """A switch that fails must never leave both VMs down: production off, replica back on."""
    current = FailbackSession.objects.get(pk=session.pk)
    if current.status != SessionStatus.SWITCHING:  # another run of this step finished it: leave its VMs alone
        _note(
            current,
            "phase2",
            f"A second run of phase 2 stopped ({exc}); failback #{session.pk} is already {current.get_status_display()}: nothing undone",
            outcome=Outcome.INFO,
            data={"error": str(exc)},
            run=run,
        )
        return
    steps = _production_off(session, hv)
    reason, ending = _reason(session, exc), "the replica runs the workload again"
    try:
        if hv.power_state(session.replica.vm_id) != POWERED_ON:
            hv.power_on(session.replica.vm_id)
            steps.append("replica powered on")
    except LeaseLost:
        raise
    except Exception as again:
        steps.append(f"replica not powered on: {again}")
        if _recovery_left_open(run, session, exc, reason, again, steps):
            return
        ending = f"the replica {session.replica.name} could NOT be powered on after {RECOVERY_ATTEMPTS} attempts: power it on by hand"
    workflow.transition(
        session.pk,
        "fail_switch",
        lease=run.token,
        error=f"{type(exc).__name__}: {reason}",
        detail=f"Switch failed: {reason}. {'; '.join(steps) or 'replica still running'}; {ending}.",
        data={"error": reason, "original": str(exc), "type": type(exc).__name__, "recovery": steps},
    )


def _production_off(session, hv):
    """The recovery's first steps: production powered off if it runs. On its own: a production VM that
    is gone or stuck must not keep the replica down."""
    steps = []
    if not session.production_vm_id:
        return steps
    try:
        if hv.power_state(session.production_vm_id) == POWERED_ON:
            hv.power_off(session.production_vm_id)
            steps.append("production VM powered off")
    except LeaseLost:
        raise
    except Exception as again:
        steps.append(f"production VM {session.vm_name} not checked: {again}")
    return steps


def _recovery_left_open(run, session, exc, reason, again, steps):
    """The platform cannot be reached or refuses: the replica may be down. Ending the session now would
    leave both VMs off, so it stays Switching and the watchdog runs phase 2 again after
    FAILBACK_STALL_SECONDS: the switch then finishes, or fails with the replica brought back.
    True when left open; False once RECOVERY_ATTEMPTS are spent."""
    tried = AuditEvent.objects.filter(session_id=session.pk, action="recover_replica").count()
    if tried >= RECOVERY_ATTEMPTS:
        return False
    _note(
        session,
        "recover_replica",
        f"Switch failed: {reason}. The replica {session.replica.name} could not be powered back on: {again}. "
        f"The switch stays open; the watchdog tries again in about {settings.FAILBACK_STALL_SECONDS} s (attempt {tried + 1} of {RECOVERY_ATTEMPTS}).",
        outcome=Outcome.FAILED,
        data={"error": reason, "original": str(exc), "type": type(exc).__name__, "recovery": steps},
        run=run,
    )
    return True
