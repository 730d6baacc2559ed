"""The actions an operator takes on one failback session, in one table.

The table drives the session page's buttons (``session_actions.html``), the dialog each button opens
(``action_dialog.html``: what will happen, with this session's names and figures, what stays as it is,
a reason field of its own and the confirmation), the page's POST (``views.session_action``) and the
API's action endpoints. Whether an action is offered is the session's guard (``FailbackSession.may``,
from ``choices.GUARDS``), the same one the service layer enforces; what it does is one call into
``workflow``. A new action is a guard, a service function and one row here.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.template import Context, Template
from django.utils import timezone

from . import plans, windows, workflow
from .choices import GUARDS, SCHEDULABLE, AuditAction, SwitchMode
from .forms import CancelForm, ReasonForm, ScheduleSwitchForm, SwitchForm, WindowsForm


@dataclass(frozen=True)
class SessionAction:
    name: str  # in the page's URL and the API's allowed_actions
    guard: str  # its choices.GUARDS key, which is also its audit action
    form: type[forms.Form]  # the dialog's form; the API's body has the same fields
    button: str  # the page's button that opens the dialog (template text, rendered with the session)
    title: str  # the dialog's question (template text; ``when`` is a scheduled switch's time)
    consequence: str  # what happens, with the concrete names and figures (template text)
    reason_label: str  # the dialog's reason field: each action asks its own question
    confirm: str  # the dialog's button that does it
    perform: Callable[[Any, int, dict], Any]  # (actor, session id, cleaned data) -> the session
    notice: Callable[[Any], str]  # what the page says once it is done
    keeps: str = ""  # what stays as it is (template text): said by the actions that hold something back
    style: str = ""  # primary | secondary (an action that keeps or stops rather than moves on)
    opener: str = ""  # a partial with fields the page's button sends to the dialog (the switch time)
    fields: str = ""  # a partial with the dialog's own fields, if any
    back: str = "Go back"  # the dialog's button that closes it and does nothing

    def render(self, text, session, **extra):
        return Template("{% load failback_tags %}" + text).render(Context({"session": session, **extra}))

    def offer(self, session):
        """What the page needs to draw this action's button for this session."""
        return {
            "name": self.name,
            "button": self.render(self.button, session),
            "style": self.style,
            "opener": self.opener,
        }

    def dialog(self, session, opened=None):
        """What the dialog says for this session, for the fields the page's button sent (``opened``)."""
        form = self.form(opened if self.opener else None, auto_id="dlg_%s")
        form.fields["reason"].label = self.render(self.reason_label, session)
        form.fields["reason"].widget.attrs["autofocus"] = True  # the dialog opens on the reason, Enter confirms
        values, problems = {}, []
        if self.opener:  # the dialog restates what the button sent: it must be valid to be confirmed
            if form.is_valid():
                values = form.cleaned_data
            else:
                problems = [f"{form.fields[f].label}: {' '.join(e)}" for f, e in form.errors.items() if f != "reason"]
        extra = {"when": values.get("switch_at"), "now": timezone.now()}
        return {
            "name": self.name,
            "title": self.render(self.title, session, **extra),
            "consequence": self.render(self.consequence, session, **extra),
            "keeps": self.render(self.keeps, session, **extra).strip(),
            "confirm": self.confirm,
            "back": self.back,
            "style": self.style,
            "fields": self.fields,
            "form": form,
            "hidden": {k: v for k, v in (opened or {}).items() if k in form.fields and k != "reason"},
            "problems": problems,
        }


def _cancelled(session):
    if session.status == "cancelled":
        return "Cancelled."
    kept = "kept for a retry" if session.keep_production_vm else "deleted"
    return f"Cancelling: the copy stops and the production VM is {kept}; the replica keeps running."


DOWNTIME = (
    "{% if session.predicted_window_s is not None %}predicted downtime {{ session.predicted_window_s|seconds }}"
    "{% else %}the downtime is predicted once phase 1 has ended{% endif %}"
)

ACTIONS = {
    a.name: a
    for a in (
        SessionAction(
            "switch",
            "switch",
            SwitchForm,
            "Switch now",
            title="Switch {{ session.replica.name }} over to {{ session.vm_name }} now?",
            consequence="The replica {{ session.replica.name }} will be shut down now (powered off if its guest has not "
            "stopped after {{ session.shutdown_timeout_s|duration }}): users lose access until {{ session.vm_name }} is up, "
            + DOWNTIME
            + ". The changes made since phase 1 are sent to {{ session.vm_name }} on {{ session.target_host }}, which is "
            "then {% if session.power_on_after %}powered on{% else %}left powered off (you chose no power-on){% endif %}.",
            keeps="The replica stays off but is kept until you commit or undo.",
            reason_label="Why switch now (reason or ticket, optional)",
            confirm="Shut down the replica and switch",
            style="primary",
            fields="failback/partials/action_switch.html",
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
            title="Switch {{ session.replica.name }} over at {{ when|date:'Y-m-d H:i T'|default:'the time given' }}?",
            consequence="{% if when %}At {{ when|date:'Y-m-d H:i T' }} ({{ when|timeuntil:now }} from now){% else %}At that time"
            "{% endif %} the replica {{ session.replica.name }} will be shut down and {{ session.vm_name }} takes over; "
            "if phase 1 is still running then, the switch comes as soon as it ends. Users lose access during the switch, "
            + DOWNTIME
            + " as of now.{% if session.switch_at %} This replaces the switch set for "
            "{{ session.switch_at|date:'Y-m-d H:i T' }}.{% endif %}",
            keeps="Until then nothing changes: the replica keeps running and serving users.",
            reason_label="Why at this time (reason or ticket, optional)",
            confirm="Schedule the switch",
            opener="failback/partials/action_schedule.html",
            perform=lambda actor, pk, d: workflow.schedule_switch(actor, pk, d["switch_at"], reason=d["reason"]),
            notice=lambda s: f"Switch scheduled for {timezone.localtime(s.switch_at):%Y-%m-%d %H:%M %Z}.",
        ),
        SessionAction(
            "windows",
            "set_switch_windows",
            WindowsForm,
            "Maintenance windows",
            title="Switch {{ session.replica.name }} only in a maintenance window, when the downtime fits?",
            consequence="The switch becomes automatic: it starts at the first moment inside one of the windows when the "
            "predicted downtime is within the budget (checked every minute; catch-up syncs run more often as a window "
            "nears). A window that passes without fitting is recorded and told, with why, and the next one is awaited. "
            "Now " + DOWNTIME + ". Leave both fields empty to go back to a manual switch.",
            keeps="The replica keeps running and serving users until then; Switch now stays possible.",
            reason_label="Why these windows (reason or ticket, optional)",
            confirm="Set the windows",
            style="secondary",
            fields="failback/partials/action_windows.html",
            perform=lambda actor, pk, d: windows.set_session_rules(
                actor, pk, windows=d["windows"], budget_s=d["downtime_budget_s"], reason=d["reason"]
            ),
            notice=lambda s: "Windows set: the switch waits for a window where the downtime fits."
            if s.switch_windows or s.downtime_budget_s is not None
            else "Windows cleared: the switch is manual.",
        ),
        SessionAction(
            "cancel",
            "cancel",
            CancelForm,
            "Cancel failback",
            title="Cancel the failback of {{ session.replica.name }}?",
            consequence="The copy to {{ session.vm_name }} stops at its next progress tick. {{ session.vm_name }} is "
            "deleted, unless you keep it below: then the next failback with the same name, host and datastore sends "
            "only the blocks that differ.",
            keeps="The replica {{ session.replica.name }} is not touched: it keeps running and serving users.",
            reason_label="Why cancel (reason or ticket, optional)",
            confirm="Cancel the failback",
            back="Keep the failback going",
            style="secondary",
            fields="failback/partials/action_cancel.html",
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
            title="Commit the failback to {{ session.vm_name }}?",
            consequence="{{ session.vm_name }} becomes the production workload for good and the replica "
            "{{ session.replica.name }} returns to normal replication (Ready). Undo will no longer be possible.",
            reason_label="Why commit: what was checked on {{ session.vm_name }} (optional)",
            confirm="Commit the failback",
            style="primary",
            perform=lambda actor, pk, d: workflow.commit(actor, pk, reason=d["reason"]),
            notice=lambda s: "Commit started.",
        ),
        SessionAction(
            "undo",
            "undo",
            ReasonForm,
            "Undo",
            title="Undo the failback and go back to {{ session.replica.name }}?",
            consequence="{{ session.vm_name }} will be powered off and deleted: changes made on the production VM since "
            "the switch will be discarded. The replica {{ session.replica.name }} is powered on again and runs the workload.",
            keeps="The replica {{ session.replica.name }} comes back as it was at the switch; the failback stays on "
            "record and a new one can start later.",
            reason_label="Why undo: what went wrong on {{ session.vm_name }} (optional)",
            confirm="Undo the failback",
            back="Keep the failback",
            style="secondary",
            perform=lambda actor, pk, d: workflow.undo(actor, pk, reason=d["reason"]),
            notice=lambda s: "Undo started: going back to the replica.",
        ),
        SessionAction(
            "stop_commit_policy",
            "stop_commit_policy",
            ReasonForm,
            "Stop the automatic {{ session.policy_verb }}",
            title="Stop the automatic {{ session.policy_verb }}?",
            consequence="Nothing happens automatically at {{ session.policy_due_at|date:'Y-m-d H:i:s T' }} any more: "
            "someone must commit or undo.",
            keeps="{{ session.vm_name }} keeps running as production; the replica stays off until then.",
            reason_label="Why stop the countdown (optional)",
            confirm="Stop the countdown",
            style="secondary",
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
    """The buttons the session page draws for an operator."""
    return [BY_GUARD[guard].offer(session) for guard in session.allowed_actions]


def held(session):
    """Why an action the session's status allows is not offered now: the page says it where the button
    would be."""
    return [
        f"{guard.label} is offered once production VM {session.vm_name} runs: the switch has not powered it on "
        "yet (the worker does right after the switch, or the watchdog if that worker stopped)."
        for guard in GUARDS.values()
        if session.status in guard.sources and guard.waits_for_production(session)
    ]


def scheduled_switch(session):
    """When a scheduled switch will come, while it still may (the page's countdown), else None."""
    if session.switch_mode == SwitchMode.SCHEDULED and session.switch_at and session.status in SCHEDULABLE:
        return session.switch_at
    return None


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
    "windows": PlanAction(
        AuditAction.SET_SWITCH_WINDOWS,
        WindowsForm,
        lambda actor, pk, d: windows.set_plan_rules(
            actor, pk, windows=d["windows"], budget_s=d["downtime_budget_s"], reason=d["reason"]
        ),
        lambda plan, done, d: f"Plan {plan.name}: "
        + (
            "the switch waits for a window where the downtime fits."
            if d["windows"] or d["downtime_budget_s"] is not None
            else "windows cleared, the switch is manual."
        ),
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
