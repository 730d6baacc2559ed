"""Four eyes on the buttons that cause downtime or lose data.

An Administrator may require a second person's approval for Switch now, Schedule switch, Commit, Undo
and Cancel: for every failback, or for one plan's members (``ApprovalRule``). Such an action, asked
for, becomes an ``ApprovalRequest`` with its arguments and reason instead of running. Another person
with the Operator role or higher (never the requester) approves it, and it then runs as the requester's
action, with both names in its audit row; or they reject it. Requests expire after
``FAILBACK_APPROVAL_MINUTES``. Every step is audited. The service functions in ``workflow`` call
``gate`` once they have checked the role and the input, so the page, the API and plans are covered alike.
"""

from contextlib import contextmanager
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import broadcast
from .audit import APPROVED, Refused, actor_name, audit, clean_reason, refuse, require_operator
from .choices import Approvable, AuditAction, Outcome
from .models import ApprovalRequest, ApprovalRule, FailbackSession

RULES_PERMISSION = "failback.change_approvalrule"
Status = ApprovalRequest.Status


class ApprovalRequested(Refused):
    """The action was not run: it waits for a second person (``request`` says which). A kind of refusal,
    so every caller that shows a refusal shows this too; the API answers 202 with the request."""

    def __init__(self, request):
        who = actor_name(request.requested_by)
        plan = request.params.get("plan_name")
        on = f"plan {plan}" if plan else f"failback #{request.session_id}"
        super().__init__(
            f"{request.get_action_display()} on {on} needs a second person's approval: "
            f"request #{request.pk} by {who} waits until {timezone.localtime(request.expires_at):%H:%M %Z}."
        )
        self.request = request


def running():
    """The approved request being run now, if any."""
    return APPROVED.get()


@contextmanager
def _run_as_approved(request):
    token = APPROVED.set(request)
    try:
        yield
    finally:
        APPROVED.reset(token)


def _services():
    from . import workflow

    def schedule(actor, session_id, switch_at, reason=""):
        return workflow.schedule_switch(actor, session_id, datetime.fromisoformat(switch_at), reason=reason)

    def plan_switch(actor, session_id, plan_id, plan_name, reason=""):
        from . import plans

        return plans.switch_now(actor, plan_id, reason=reason)

    def plan_schedule(actor, session_id, plan_id, plan_name, switch_at, reason=""):
        from . import plans

        return plans.schedule_switch(actor, plan_id, datetime.fromisoformat(switch_at), reason=reason)

    def plan_finalise(action):
        def run(actor, session_id, plan_id, plan_name, reason=""):
            from . import plans

            return getattr(plans, action)(actor, plan_id, reason=reason)

        return run

    return {
        "switch": workflow.switch_now,
        "schedule_switch": schedule,
        "commit": workflow.commit,
        "undo": workflow.undo,
        "cancel": workflow.cancel,
        "plan:switch": plan_switch,
        "plan:schedule_switch": plan_schedule,
        "plan:commit": plan_finalise("commit"),
        "plan:undo": plan_finalise("undo"),
    }


def required(session, action):
    """Whether ``action`` on ``session`` needs approval: a rule for every failback, or for its plan."""
    if action not in Approvable.values:
        return False
    rules = ApprovalRule.objects.filter(action=action)
    return rules.filter(plan=None).exists() or (
        session.plan_id is not None and rules.filter(plan_id=session.plan_id).exists()
    )


def gate(actor, action, session_id, **params):
    """Called by the service function before it acts: returns when it may act now; raises
    ``ApprovalRequested`` after recording a request when a second person must approve it first."""
    session = FailbackSession.objects.select_related("plan").filter(pk=session_id).first()
    if covers(running(), session, action):
        return  # this is the approved request being run (its own, or its plan's)
    if session is None or not session.may(action) or not required(session, action):
        return  # nothing to approve: the service function refuses, or acts
    stored = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in params.items()}
    raise ApprovalRequested(_ask(actor, session, action, stored))


def covers(request, session, action):
    """Whether the approved ``request`` being run is ``action`` on ``session``: its own request, or its plan's
    (a plan's Commit, say, runs each member's commit under the one request)."""
    if request is None or session is None or request.action != action:
        return False
    return request.session_id == session.pk or (
        session.plan_id is not None and request.params.get("plan_id") == session.plan_id
    )


def gate_plan(actor, action, plan, member, **params):
    """A plan's own Switch now, Schedule switch, Commit or Undo (plans.py): like ``gate``, for a rule on every
    failback or on the plan. The request is held by the plan's first live ``member`` and names the plan; approved, it
    runs the plan's action as the requester's."""
    request = running()
    if request is not None and request.action == action and request.params.get("plan_id") == plan.pk:
        return
    if not required(member, action):
        return
    stored = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in params.items()}
    raise ApprovalRequested(_ask(actor, member, action, {"plan_id": plan.pk, "plan_name": plan.name, **stored}))


def running_for_plan(plan):
    """The approved request of ``plan``'s own action being run now, if any."""
    request = running()
    return request if request is not None and request.params.get("plan_id") == plan.pk else None


def hold(session, action, detail, **params):
    """The portal's own moment for ``action`` (an automatic or scheduled switch, the commit policy): True
    when it must wait because the action needs approval (a request by the portal then waits, made once,
    and the page says so); False to act now."""
    if running() is not None or not required(session, action):
        return False
    # Once per moment: a request the portal made and someone then rejected (or let expire) is not made
    # again at the watchdog's next round; a person acts instead.
    if not ApprovalRequest.objects.filter(session=session, action=action, requested_by=None).exists():
        try:
            _ask(None, session, action, {"detail": detail, **params}, by_portal=True)
        except Refused:  # made at the same moment by another run of this step
            pass
    return True


def hold_plan(plan, member, action, detail, **params):
    """A plan's own moment (its automatic, scheduled or window switch): True when it must wait because the
    action needs approval, for every failback or for the plan. Like ``hold``: the portal's request, made
    once per plan and action, held by the plan's first live ``member`` and naming the plan; approved, the
    plan's switch runs (``_run_portal_action``)."""
    if running() is not None or not required(member, action):
        return False
    asked = ApprovalRequest.objects.filter(
        session__plan_id=plan.pk, action=action, requested_by=None, params__plan_id=plan.pk
    )
    if not asked.exists():
        try:
            _ask(None, member, action, {"plan_id": plan.pk, "plan_name": plan.name, "detail": detail, **params},
                 by_portal=True)  # fmt: skip
        except Refused:  # made at the same moment by another run of this step
            pass
    return True


def waiting(session, now=None):
    """The requests about this session that wait for a second person now (the page and the API show them)."""
    now = now or timezone.now()
    rows = getattr(session, "pending_approvals", None)  # prefetched by the lists (api_render)
    if rows is None:
        rows = session.approvals.filter(status=Status.PENDING).select_related("requested_by")
    return [r for r in rows if r.status == Status.PENDING and r.expires_at > now]


def waiting_for_plan(members, plan, now=None):
    """The plan's own requests (its switch or schedule) that wait now; they are held by a member."""
    return [r for s in members for r in waiting(s, now) if r.params.get("plan_id") == plan.pk]


def describe(request):
    """One line for the page and the API: what waits, asked by whom, until when."""
    who = "the portal" if request.requested_by_id is None else actor_name(request.requested_by)
    plan = request.params.get("plan_name")
    what = request.params.get("detail") or f"{request.get_action_display()}" + (f" on plan {plan}" if plan else "")
    return (
        f"{what}: waiting for approval (request #{request.pk}, asked by {who}, "
        f"until {timezone.localtime(request.expires_at):%H:%M %Z})"
    )


def _ask(actor, session, action, params, by_portal=False):
    reason = params.get("reason", "")
    expires = timezone.now() + timedelta(minutes=settings.FAILBACK_APPROVAL_MINUTES)
    try:
        with transaction.atomic():
            request = ApprovalRequest.objects.create(
                session=session, action=action, params=params, requested_by=actor, expires_at=expires
            )
            audit(
                action=AuditAction.REQUEST_APPROVAL,
                outcome=Outcome.INFO,
                actor=actor,
                session=session,
                from_state=session.status,
                to_state=session.status,
                detail=(
                    f"{params['detail']}: waiting for a person's approval (request #{request.pk}); nothing is done until then"
                    if by_portal
                    else f"{request.get_action_display()} asked for, waiting for a second person's approval "
                    f"(request #{request.pk})" + (f": {reason}" if reason else "")
                ),
                data={"request": request.pk, "action": action, "params": params, "expires_at": expires.isoformat()},
            )
            broadcast.session_changed(session.pk)  # its page (and its plan's) says what waits
            return request
    except IntegrityError:
        waiting = ApprovalRequest.objects.filter(session=session, action=action, status=Status.PENDING).first()
        refuse(
            f"{Approvable(action).label} refused: request #{waiting.pk if waiting else '?'} by "
            f"{actor_name(waiting.requested_by) if waiting else 'someone'} already waits for approval.",
            action=action,
            actor=actor,
            session=session,
            from_state=session.status,
        )


def _decide(actor, request_id, verb, reason):
    """Lock the request and check it may be decided by ``actor`` now; the row, or a refusal."""
    action = AuditAction.APPROVE if verb == "approve" else AuditAction.REJECT
    require_operator(actor, action)
    reason = clean_reason(reason, action=action, actor=actor)
    expire_due()
    with transaction.atomic():
        request = ApprovalRequest.objects.select_for_update().filter(pk=request_id).first()
        problem = _why_not(actor, request, verb)
        if problem is None:
            request.status = Status.DONE if verb == "approve" else Status.REJECTED
            request.decided_by, request.decided_at, request.decision_reason = actor, timezone.now(), reason
            request.save(update_fields=["status", "decided_by", "decided_at", "decision_reason"])
            _audit_decision(actor, request, action, reason)
            return request
    session = request.session if request else None
    refuse(problem, action=action, actor=actor, session=session, from_state=session.status if session else "")


def _why_not(actor, request, verb):
    if request is None:
        return "There is no such approval request."
    if request.status != Status.PENDING:
        who = f" by {actor_name(request.decided_by)}" if request.decided_by_id else ""
        return f"Request #{request.pk} was already decided{who} ({request.get_status_display().lower()}): nothing to {verb}."
    if verb == "approve" and request.requested_by_id == actor.pk:
        return f"You asked for request #{request.pk}: a second person must approve it."
    return None


def _audit_decision(actor, request, action, reason):
    session = request.session
    verb = "approved" if action == AuditAction.APPROVE else "rejected"
    audit(
        action=action,
        actor=actor,
        session=session,
        from_state=session.status,
        to_state=session.status,
        detail=f"{request.get_action_display()} asked for by {actor_name(request.requested_by)} {verb} by "
        f"{actor_name(actor)} (request #{request.pk})" + (f": {reason}" if reason else ""),
        data={"request": request.pk, "action": request.action, "requested_by": actor_name(request.requested_by)},
    )


def approve(actor, request_id, *, reason=""):
    """Approve a waiting request and run its action as the requester's. Returns the request, its result set."""
    request = _decide(actor, request_id, "approve", reason)
    try:
        with _run_as_approved(request):
            if request.requested_by_id is None:  # the portal's own moment, held for approval
                done = _run_portal_action(request)
            else:
                service = ("plan:" if "plan_id" in request.params else "") + request.action
                done = _services()[service](request.requested_by, request.session_id, **request.params)
        request.result = "done"
        if not done:  # refused without raising: the checks held an automatic switch back (its row says why)
            request.status = Status.FAILED
            request.result = "Approved, but not done: see the failback's audit trail (the pre-switch checks, say)."
    except Refused as refused:  # the session moved on meanwhile: the service's refusal is in the trail
        request.status, request.result = Status.FAILED, refused.message
    request.save(update_fields=["status", "result"])
    return request


def _run_portal_action(request):
    """What the portal would have done at its moment, done now that someone approved it."""
    from . import workflow

    why = f"{request.params.get('detail', request.get_action_display())}, approved by {actor_name(request.decided_by)}"
    data = {k: v for k, v in request.params.items() if k != "detail"}
    if "plan_id" in request.params:  # a plan's automatic, scheduled or window switch
        from . import plans

        return plans.switch_if_due(request.params["plan_id"], trigger=data.get("trigger", "auto"), reason=why)
    if request.action == Approvable.SWITCH:
        return workflow.begin_switch(request.session_id, actor=None, detail=why, data=data)
    return workflow.transition(
        request.session_id, request.action, detail=why, data=data, then=workflow.finalise(request.action)
    )


def reject(actor, request_id, *, reason=""):
    return _decide(actor, request_id, "reject", reason)


def expire_due():
    """Mark every waiting request past its time as expired, each with its audit row."""
    for request in ApprovalRequest.objects.filter(status=Status.PENDING, expires_at__lte=timezone.now()):
        with transaction.atomic():
            if ApprovalRequest.objects.filter(pk=request.pk, status=Status.PENDING).update(status=Status.EXPIRED):
                audit(
                    action=AuditAction.APPROVAL_EXPIRED,
                    outcome=Outcome.INFO,
                    session=request.session,
                    from_state=request.session.status,
                    to_state=request.session.status,
                    detail=f"Request #{request.pk} ({request.get_action_display()} by {actor_name(request.requested_by)}) "
                    "expired without a decision; nothing was done",
                    data={"request": request.pk, "action": request.action},
                )


def set_rule(actor, action, *, required=True, plan=None):
    """An Administrator requires (or stops requiring) approval for ``action``, everywhere or for one plan."""
    what = AuditAction.APPROVAL_RULE
    if actor is None or not actor.has_perm(RULES_PERMISSION):
        refuse(f"{actor_name(actor)} may not change which actions need approval: the Administrator role is needed.",
               action=what, actor=actor, forbidden=True)  # fmt: skip
    if action not in Approvable.values:
        refuse(
            f"Unknown action {action!r}; these can need approval: {', '.join(Approvable.values)}.",
            action=what,
            actor=actor,
        )
    rules = ApprovalRule.objects.filter(action=action, plan=plan)
    with transaction.atomic():
        if required and not rules.exists():
            ApprovalRule.objects.create(action=action, plan=plan, created_by=actor)
        elif not required:
            rules.delete()
        where = f"plan {plan.name}" if plan else "every failback"
        audit(
            action=what,
            actor=actor,
            detail=f"{Approvable(action).label} {'needs' if required else 'no longer needs'} a second person's approval on {where}",
            data={"action": action, "required": required, "plan": plan.pk if plan else None},
        )
