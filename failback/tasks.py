"""django-q2 entry points: primary keys in, one call into the service layer each. No rules here."""

from . import automatic, jobs
from .watchdog import recover_stalled


def phase1(session_id, resume=False):
    jobs.run_phase1(session_id, resume=resume)


def phase2(session_id, resume=False):
    jobs.run_switch(session_id)


def commit(session_id, resume=False):
    jobs.run_commit(session_id)


def undo(session_id, resume=False):
    jobs.run_undo(session_id)


def power_on(session_id, resume=False):
    jobs.run_power_on(session_id)


def cancel(session_id, resume=False):
    jobs.run_cancel(session_id)


def watchdog():
    from .approvals import expire_due
    from .checks import record_scheduler_clock

    record_scheduler_clock()
    recover_stalled()
    expire_due()  # a request past its time is marked expired, and audited, within a minute


def readiness():
    """Every minute: each Ready-to-switch session gets its catch-up (when due) and a fresh prediction."""
    from .choices import SessionStatus, SwitchMode
    from .models import FailbackPlan, FailbackSession

    for session_id in FailbackSession.objects.filter(status=SessionStatus.READY_TO_SWITCH).values_list("pk", flat=True):
        jobs.run_readiness(session_id)
        automatic.switch_when_fits(session_id)  # a session waiting for a window where its downtime fits
    for session_id in automatic.copying_with_windows():
        automatic.switch_when_fits(session_id)  # a window that passes during phase 1 is told
    for plan_id in FailbackPlan.objects.filter(switch_started_at=None, switch_mode=SwitchMode.AUTO).values_list(
        "pk", flat=True
    ):
        automatic.plan_switch_when_fits(plan_id)


def commit_policy(session_id):
    automatic.commit_policy_due(int(session_id))


def scheduled_switch(session_id):
    automatic.scheduled_switch_due(int(session_id))


def sync_inventory(connection_id):
    from . import connections

    connections.sync_inventory(int(connection_id))


def plan_switch(plan_id):
    jobs.run_plan_switch(int(plan_id))


def plan_scheduled_switch(plan_id):
    from . import plans

    plans.scheduled_switch_due(int(plan_id))
