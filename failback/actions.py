"""The actions an operator takes on one failback session, in one table.

The table drives the session page's buttons (``session_actions.html``), the page's POST
(``views.session_action``) and the API's action endpoints. Whether an action is offered is the
session's guard (``FailbackSession.may``, from ``choices.GUARDS``), the same one the service layer
enforces; what it does is one call into ``workflow``. A new action is a guard, a service function
and one row here.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.template import Context, Template
from django.utils import timezone

from . import plans, workflow
from .choices import AuditAction
from .forms import CancelForm, ReasonForm, ScheduleSwitchForm, SwitchForm


@dataclass(frozen=True)
class SessionAction:
    name: str  # in the page's URL and the API's allowed_actions
    guard: str  # its choices.GUARDS key, which is also its audit action
    form: type[forms.Form]  # the page's form; the API's body has the same fields
    button: str  # template text, rendered with the session
    confirm: str  # the confirmation question (template text)
    perform: Callable[[Any, int, dict], Any]  # (actor, session id, cleaned data) -> the session
    notice: Callable[[Any], str]  # what the page says once it is done
    style: str = ""
    fields: str = ""  # a partial with the action's own fields, if any

    def render(self, text, session):
        return Template(text).render(Context({"session": session}))

    def offer(self, session):
        """What the page needs to draw this action's form for this session."""
        return {
            "name": self.name,
            "button": self.render(self.button, session),
            "style": self.style,
            "confirm": self.render(self.confirm, session),
            "fields": self.fields,
        }


def _cancelled(session):
    if session.status == "cancelled":
        return "Cancelled."
    kept = "kept for a retry" if session.keep_production_vm else "deleted"
    return f"Cancelling: the copy stops and the production VM is {kept}; the replica keeps running."


ACTIONS = {
    a.name: a
    for a in (
        SessionAction(
            "switch",
            "switch",
            SwitchForm,
            "Switch now",
            style="primary",
            fields="failback/partials/action_switch.html",
            confirm="Switch now? The replica {{ session.replica.name }} will be shut down (users lose access until the production VM "
            "is up), the last changes sent, and {{ session.vm_name }}{% if session.power_on_after %} powered on"
            "{% else %} left powered off{% endif %}.",
            perform=lambda actor, pk, d: workflow.switch_now(
                actor, pk, reason=d["reason"], override_checks=d["override_checks"]
            ),
            notice=lambda s: "Switch started: the replica is being stopped.",
        ),
        SessionAction(
            "schedule",
            "schedule_switch",
            ScheduleSwitchForm,
            "Schedule switch",
            fields="failback/partials/action_schedule.html",
            confirm="Schedule the switch for this time? The replica will be shut down then.",
            perform=lambda actor, pk, d: workflow.schedule_switch(actor, pk, d["switch_at"], reason=d["reason"]),
            notice=lambda s: f"Switch scheduled for {timezone.localtime(s.switch_at):%Y-%m-%d %H:%M %Z}.",
        ),
        SessionAction(
            "cancel",
            "cancel",
            CancelForm,
            "Cancel failback",
            fields="failback/partials/action_cancel.html",
            confirm="Cancel this failback? The copy stops; the replica {{ session.replica.name }} is not touched and keeps running. "
            "The production VM {{ session.vm_name }} is deleted unless you chose to keep it.",
            perform=lambda actor, pk, d: workflow.cancel(
                actor, pk, keep_production_vm=d["keep_production_vm"], reason=d["reason"]
            ),
            notice=_cancelled,
        ),
        SessionAction(
            "commit",
            "commit",
            ReasonForm,
            "Commit",
            style="primary",
            confirm="Commit failback? {{ session.vm_name }} becomes the production workload for good and the replica "
            "{{ session.replica.name }} returns to normal replication. Undo will no longer be possible.",
            perform=lambda actor, pk, d: workflow.commit(actor, pk, reason=d["reason"]),
            notice=lambda s: "Commit started.",
        ),
        SessionAction(
            "undo",
            "undo",
            ReasonForm,
            "Undo",
            style="danger",
            confirm="Undo failback? {{ session.vm_name }} will be powered off and deleted: changes made on the production VM since "
            "the switch will be discarded. The replica {{ session.replica.name }} is powered on again and runs the workload.",
            perform=lambda actor, pk, d: workflow.undo(actor, pk, reason=d["reason"]),
            notice=lambda s: "Undo started: going back to the replica.",
        ),
        SessionAction(
            "stop_commit_policy",
            "stop_commit_policy",
            ReasonForm,
            "Stop the automatic {{ session.policy_verb }}",
            confirm="Stop the countdown? Nothing happens automatically any more: someone must commit or undo.",
            perform=lambda actor, pk, d: workflow.stop_commit_policy(actor, pk, reason=d["reason"]),
            notice=lambda s: "Countdown stopped: commit or undo when you are ready.",
        ),
    )
}
BY_GUARD = {a.guard: a for a in ACTIONS.values()}


def allowed(session):
    """The actions this session's guards allow now, by name (the API's ``allowed_actions``)."""
    return [BY_GUARD[guard].name for guard in session.allowed_actions]


def offered(session):
    """The forms the session page draws for an operator."""
    return [BY_GUARD[guard].offer(session) for guard in session.allowed_actions]


def perform(name, actor, session_id, data):
    """Run the named action with already-validated data (a form's cleaned data or an API body)."""
    return ACTIONS[name].perform(actor, session_id, data)


# -- a plan's actions (its page; the API has one endpoint each) ------------------------------------


@dataclass(frozen=True)
class PlanAction:
    audit: AuditAction
    form: type[forms.Form]
    perform: Callable[[Any, int, dict], Any]  # (actor, plan id, cleaned data) -> the service's answer
    notice: Callable[[Any, Any, dict], str]  # (plan, answer, data) -> the page's message


PLAN_ACTIONS = {
    "switch": PlanAction(
        AuditAction.SWITCH_PLAN,
        ReasonForm,
        lambda actor, pk, d: plans.switch_now(actor, pk, reason=d["reason"]),
        lambda plan, done, d: f"Plan {plan.name} is switching, member by member.",
    ),
    "schedule": PlanAction(
        AuditAction.SCHEDULE_PLAN_SWITCH,
        ScheduleSwitchForm,
        lambda actor, pk, d: plans.schedule_switch(actor, pk, d["switch_at"], reason=d["reason"]),
        lambda plan,
        done,
        d: f"Plan {plan.name} will switch at {timezone.localtime(d['switch_at']):%Y-%m-%d %H:%M %Z}.",
    ),
    "commit": PlanAction(
        AuditAction.COMMIT_PLAN,
        ReasonForm,
        lambda actor, pk, d: plans.commit(actor, pk, reason=d["reason"]),
        lambda plan, done, d: f"Commit started for {len(done)} member(s).",
    ),
    "undo": PlanAction(
        AuditAction.UNDO_PLAN,
        ReasonForm,
        lambda actor, pk, d: plans.undo(actor, pk, reason=d["reason"]),
        lambda plan, done, d: f"Undo started for {len(done)} member(s).",
    ),
}
