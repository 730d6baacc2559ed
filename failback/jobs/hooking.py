"""The hooks a session runs at one point of its steps (hooks.py says what a hook is and where it comes from).

Each run is one audit row (``run_hook``) with the exit code and the output. A hook that already ran for
this session at this point is not run again when a step is resumed or taken over. A failing hook whose
entry says ``on_error = "fail"`` fails the step before phase 1 or before the switch (the replica is still
running then); at the later points the step has already happened, so the failure is recorded and the
failback goes on.
"""

from .. import hooks
from ..choices import AuditAction, Outcome
from ..models import AuditEvent
from .runs import _note


def run_hooks(run, session, point):
    """Run ``session``'s hooks for ``point`` in order; raise ``hooks.HookFailed`` if one fails the step."""
    names = (session.hooks or {}).get(point, [])
    if names:  # the step may have just moved the session on: the hook and its audit row see where it is now
        session.refresh_from_db(fields=["status", "production_vm_id"])
    for name in names:
        if _ran(session, point, name):
            continue
        hook = hooks.allowed().get(name)
        if hook is None:
            text = f"Hook {name} ({hooks.POINTS[point]}) not run: it is no longer in the allow-list"
            _note(
                session,
                AuditAction.RUN_HOOK,
                text,
                outcome=Outcome.FAILED,
                data={"point": point, "hook": name},
                run=run,
            )
            if point in hooks.STOPPING_POINTS:
                raise hooks.HookFailed(text)
            continue
        result = hooks.execute(hook, hooks.facts(session, point))
        text, data = hooks.describe(hook, point, result)
        _note(
            session, AuditAction.RUN_HOOK, text, outcome=Outcome.OK if result.ok else Outcome.FAILED, data=data, run=run
        )
        if not result.ok and hook.on_error == "fail" and point in hooks.STOPPING_POINTS:
            raise hooks.HookFailed(text)


def _ran(session, point, name):
    """Already run at this point: done, or failed where the failback was to continue."""
    rows = AuditEvent.objects.filter(
        session_id=session.pk, action=AuditAction.RUN_HOOK, data__point=point, data__hook=name
    )
    return rows.filter(outcome=Outcome.OK).exists() or rows.filter(data__on_error="continue").exists()
