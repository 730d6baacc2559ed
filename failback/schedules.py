"""Background work, queued and scheduled: a step for a worker, a switch or a policy at its moment.

Steps are queued once the current transaction commits, with the primary key only; the worker reads
everything else from the database. One django-q2 schedule per session (and per plan) fires a
scheduled switch or a commit policy; the time itself lives on the row, which decides when it fires.

django-q2's scheduler looks at its schedules about every 30 s (a fixed cadence of its sentinel), so a
schedule set for the moment itself fires up to half a minute late. A switch must start on its second:
its schedule fires ``SWITCH_LEAD`` early and the task waits for the moment itself (``wait_for_moment``);
a moment nearer than the lead is queued at once and waits the same way.
"""

import time
from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from django_q.models import Schedule
from django_q.tasks import async_task

from .audit import refuse


def enqueue(task, session_id, **kwargs):
    """Queue a step for a worker once the current transaction has committed (primary key only)."""
    transaction.on_commit(
        lambda: async_task(
            f"failback.tasks.{task}",
            session_id,
            **kwargs,
            task_name=f"{task}-{session_id}-{timezone.now():%H%M%S%f}",
            group=f"session-{session_id}",
        )
    )


def _once(name, func, arg, when):
    Schedule.objects.update_or_create(
        name=name,
        defaults={"func": func, "args": str(arg), "schedule_type": Schedule.ONCE, "repeats": 1, "next_run": when},
    )


# Longer than django-q2's scheduler cadence (30 s, plus its loop's own time) and a broker poll.
SWITCH_LEAD = timedelta(seconds=45)


def _on_the_second(name, func, arg, when):
    """A task that must start at ``when`` itself: scheduled SWITCH_LEAD early, or queued now if that is past."""
    if when - SWITCH_LEAD > timezone.now():
        _once(name, func, arg, when - SWITCH_LEAD)
        return
    Schedule.objects.filter(name=name).delete()
    transaction.on_commit(lambda: async_task(func, arg, task_name=f"{name}-{timezone.now():%H%M%S%f}"))


def wait_for_moment(read_moment):
    """Sleep until the moment ``read_moment()`` returns, re-read every second (it may be moved meanwhile).

    Returns at once when there is no moment, when it has passed, or when it is further away than the lead
    (it was moved later: the caller re-schedules)."""
    while True:
        moment = read_moment()
        left = (moment - timezone.now()).total_seconds() if moment else 0
        if left <= 0 or left > SWITCH_LEAD.total_seconds() + 1:
            return
        time.sleep(min(left, 1.0))


def switch_schedule_name(session_id):
    return f"failback-switch-{session_id}"


def set_switch_schedule(session):
    _on_the_second(switch_schedule_name(session.pk), "failback.tasks.scheduled_switch", session.pk, session.switch_at)


def drop_switch_schedule(session_id):
    Schedule.objects.filter(name=switch_schedule_name(session_id)).delete()


def policy_schedule_name(session_id):
    return f"failback-policy-{session_id}"


def set_policy_schedule(session):
    _once(policy_schedule_name(session.pk), "failback.tasks.commit_policy", session.pk, session.policy_due_at)


def drop_policy_schedule(session_id):
    Schedule.objects.filter(name=policy_schedule_name(session_id)).delete()


def plan_schedule_name(plan_id):
    return f"failback-plan-switch-{plan_id}"


def set_plan_schedule(plan):
    _on_the_second(plan_schedule_name(plan.pk), "failback.tasks.plan_scheduled_switch", plan.pk, plan.switch_at)


def drop_plan_schedule(plan_id):
    Schedule.objects.filter(name=plan_schedule_name(plan_id)).delete()


def validate_switch_time(switch_at, *, action, actor, **where):
    if switch_at is None:
        refuse("A scheduled switch needs a date and time.", action=action, actor=actor, **where)
    if timezone.is_naive(switch_at):
        refuse("The switch time must include a time zone.", action=action, actor=actor, **where)
    if switch_at <= timezone.now() + timedelta(seconds=5):
        refuse(
            f"The switch time {switch_at:%Y-%m-%d %H:%M:%S %Z} is in the past; pick a time in the future.",
            action=action,
            actor=actor,
            **where,
        )
    if switch_at > timezone.now() + timedelta(days=366):
        refuse("The switch time is more than a year away.", action=action, actor=actor, **where)
