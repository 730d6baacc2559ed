"""The end of a failback: commit, undo and cancel, and which production VM a session may touch."""

from contextlib import closing

from django.conf import settings

from .. import logging_context, workflow
from ..choices import Outcome, SessionStatus
from ..hypervisors.base import POWERED_OFF, POWERED_ON, NotFound
from ..hypervisors.registry import hypervisor_for
from ..models import AuditEvent, Replica
from .hooking import run_hooks
from .runs import LeaseLost, _drop_state, _note, _take, session_lock, superseded

UNDO_ATTEMPTS = 3  # runs of the undo step (the first and the watchdog's) before it ends with "act by hand"


# -- ownership ---------------------------------------------------------------------------------


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
        return (
            None,
            f"VM {vm_id} does not carry this failback's owner tag (it has {owner or 'none'}): it is not this failback's",
        )
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
            _note(
                session,
                "delete_production_vm",
                f"Nothing discarded: {why_not}",
                outcome=Outcome.INFO,
                data={"why": why_not},
                run=run,
            )
        return
    try:
        if hv.power_state(vm_id) != POWERED_OFF:
            hv.power_off(vm_id)
        hv.delete_vm(vm_id)
        unrecorded = (
            ""
            if session.production_vm_id
            else " (created by the platform although its answer never arrived; found by its owner tag)"
        )
        _note(
            session,
            "delete_production_vm",
            f"Discarded the half-built production VM {session.vm_name} ({vm_id}){unrecorded}",
            data={"vm_id": vm_id, "owner_tag": session.owner_tag},
            run=run,
        )
    except LeaseLost:
        raise
    except Exception as exc:
        _note(
            session,
            "delete_production_vm",
            f"Could not discard production VM {session.vm_name}: {exc}",
            outcome=Outcome.FAILED,
            data={"error": str(exc)},
            run=run,
        )


# -- commit ------------------------------------------------------------------------------------


@logging_context.step("commit")
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

    workflow.transition(
        session.pk,
        "finish_commit",
        then=then,
        lease=run.token,
        detail=f"Production VM {session.vm_name} ({session.production_vm_id}) is now the workload replica "
        f"{session.replica.name} protects, in place of "
        + (f"production VM {old_source}" if session.replica.production_vm_id else f"the original VM {old_source}")
        + "; the replica returns to normal replication",
        data={"production_vm_id": session.production_vm_id, "previous_source": old_source},
    )
    run_hooks(run, session, "after_commit")
    _drop_state(session.pk)


# -- undo --------------------------------------------------------------------------------------


@logging_context.step("undo")
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
        _back_to_replica(session, hv, steps)
    except LeaseLost:
        raise
    except Exception as exc:
        _undo_failed(run, session, hv, exc, steps)
        return
    workflow.transition(
        session.pk, "finish_undo", lease=run.token, detail="; ".join(steps).capitalize(), data={"steps": steps}
    )
    run_hooks(run, session, "after_undo")
    _drop_state(session.pk)


def _back_to_replica(session, hv, steps):
    """Production off, replica on, production deleted; each step done is appended to ``steps``."""
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


def _undo_failed(run, session, hv, exc, steps):
    """Noted for the watchdog to try again; after UNDO_ATTEMPTS, the undo fails and says what to do by hand."""
    tried = AuditEvent.objects.filter(session_id=session.pk, action="undo", outcome=Outcome.FAILED).count() + 1
    done = "; ".join(steps) or "nothing"
    if tried < UNDO_ATTEMPTS:
        _note(
            session,
            "undo",
            f"Undo could not complete: {exc} (done so far: {done}). The watchdog tries again in about "
            f"{settings.FAILBACK_STALL_SECONDS} s (attempt {tried} of {UNDO_ATTEMPTS}).",
            outcome=Outcome.FAILED,
            data={"error": str(exc), "steps": steps, "attempt": tried},
            run=run,
        )
        return  # still Undoing: the watchdog queues the step again once its heartbeat is old
    replica_on = "replica powered on" in steps or _powered_on(hv, session.replica.vm_id)
    by_hand = (
        "the replica runs; check the production VM by hand"
        if replica_on
        else f"the replica {session.replica.name} is NOT running: power it on by hand"
    )
    workflow.transition(
        session.pk,
        "fail_undo",
        lease=run.token,
        error=f"{type(exc).__name__}: {exc}",
        detail=f"Undo failed after {UNDO_ATTEMPTS} attempts: {exc} (done: {done}); {by_hand}.",
        data={"error": str(exc), "steps": steps, "attempts": UNDO_ATTEMPTS, "replica_on": replica_on},
    )


def _powered_on(hv, vm_id):
    try:
        return hv.power_state(vm_id) == POWERED_ON
    except Exception:
        return False


# -- cancel ------------------------------------------------------------------------------------


@logging_context.step("cancel")
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
        detail = _keep_or_discard(run, session, hv)
    workflow.transition(
        session.pk,
        "finish_cancel",
        lease=run.token,
        detail=f"{detail}. The replica was not touched and is {replica_power}.",
        data={
            "kept_vm_id": session.production_vm_id if session.keep_production_vm else None,
            "replica_power": replica_power,
        },
    )


def _keep_or_discard(run, session, hv):
    """The production VM of a cancelled failback: kept powered off with its copy map, or deleted."""
    if not session.production_vm_id:
        return "Nothing had been built yet"
    if session.keep_production_vm:
        try:
            if hv.power_state(session.production_vm_id) != POWERED_OFF:
                hv.power_off(session.production_vm_id)
        except NotFound:  # gone already (deleted by hand, or by a phase 1 that failed): nothing to keep
            _drop_state(session.pk)
            return f"Production VM {session.vm_name} ({session.production_vm_id}) no longer exists: nothing was kept"
        return (
            f"Production VM {session.vm_name} kept, powered off, with its copy map: a new failback of {session.replica.name} "
            f"to {session.vm_name} on {session.target_host}/{session.target_datastore} sends only what differs"
        )
    _discard_production_vm(session, hv, run)
    _drop_state(session.pk)
    return f"Half-built production VM {session.vm_name} deleted"
