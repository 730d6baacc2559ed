"""The append-only audit trail: who did what, when, from which state to which, with what result.

Every module that acts writes here through ``audit()``; a refusal goes through ``refuse()``, which
writes its row in a transaction of its own (``durable=True``: Django refuses to run it inside a
caller's transaction, so a rollback can never take the refusal's row with it) and raises ``Refused``.
"""

import contextvars

from django.db import transaction

from .choices import TRANSITIONS, AuditAction, Outcome
from .models import AuditEvent, FailbackSession
from .notifications import hook as notifications

OPERATE_PERMISSION = "failback.operate_failback"
OVERRIDE_PERMISSION = "failback.override_checks"
REASON_MAX = 500
# The approved request (approvals.py) being run now: the rows its action writes name the approver.
APPROVED = contextvars.ContextVar("approved_request", default=None)


class Refused(Exception):
    """An action that is not allowed now, or input that cannot be accepted. Already audited.

    ``forbidden`` is true when the actor's role is the reason (the API answers 403 rather than 409)."""

    def __init__(self, message, *, forbidden=False):
        super().__init__(message)
        self.message = message
        self.forbidden = forbidden


def actor_name(actor):
    return actor.get_username() if actor is not None else "system"


def audit(
    *,
    action,
    outcome=Outcome.OK,
    actor=None,
    session=None,
    replica=None,
    from_state="",
    to_state="",
    detail="",
    data=None,
    name=None,
):
    """Write one row. ``action`` must be an ``AuditAction`` (one spelling each): anything else is a bug."""
    action = AuditAction(action)
    if isinstance(session, int):
        session = FailbackSession.objects.filter(pk=session).first() or None
    if replica is None and session is not None:
        replica = session.replica_id
    via = getattr(actor, "api_token", None)  # set by the API's authentication: the row says it came that way
    if via is not None:
        data = {**(data or {}), "via": "api", "api_token": {"id": via.pk, "name": via.name, "prefix": via.prefix}}
    approved = APPROVED.get()
    if (
        approved is not None
        and session is not None
        and (
            session.pk == approved.session_id  # its own request, or its plan's (held by the plan's first member)
            or (session.plan_id is not None and approved.params.get("plan_id") == session.plan_id)
        )
    ):
        data = {**(data or {}), "approved_by": actor_name(approved.decided_by), "approval_request": approved.pk}
    detail, data = without_nul(detail), without_nul(data or {})  # PostgreSQL stores no NUL in text or JSON
    row = AuditEvent.objects.create(
        actor=actor,
        actor_name=name or actor_name(actor),  # name: who it claimed to be, when nobody is logged in
        action=action,
        session_id=getattr(session, "pk", session),
        replica_id=getattr(replica, "pk", replica),
        from_state=from_state or "",
        to_state=to_state or "",
        outcome=outcome,
        detail=detail,
        data=data or {},
    )
    notifications.audited(row)  # what this row tells is sent after commit, never inside the step
    return row


def without_nul(value):
    """NUL characters (hostile input quoted in a refusal) kept visible as ``\\x00``."""
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value


def refuse(message, *, action, actor=None, session=None, replica=None, from_state="", data=None, forbidden=False):
    """Audit a refused attempt in its own transaction and raise ``Refused``.

    ``durable=True`` makes calling this inside another transaction an error at once (in tests too), so
    the refusal's row cannot be rolled back with the caller's work."""
    with transaction.atomic(durable=True):
        audit(
            action=action,
            outcome=Outcome.REFUSED,
            actor=actor,
            session=session,
            replica=replica,
            from_state=from_state,
            detail=message,
            data=data,
        )
    raise Refused(message, forbidden=forbidden)


def refuse_input(message, *, action, actor, **where):
    """A form the view could not even parse (malformed time, oversized field, unknown choice): the
    refusal is audited like any other, and its message returned for the page."""
    try:
        refuse(message, action=action, actor=actor, **where)
    except Refused as refused:
        return refused.message


def action_label(action):
    if action in TRANSITIONS:
        return TRANSITIONS[action].label.lower()
    return action.replace("_", " ")


def require_operator(actor, action, **where):
    if actor is None or not actor.has_perm(OPERATE_PERMISSION):
        refuse(
            f"{actor_name(actor)} may not {action_label(action)}: the Operator role is needed.",
            action=action,
            actor=actor,
            forbidden=True,
            **where,
        )


def clean_reason(reason, *, action, actor, **where):
    reason = (reason or "").strip()
    if len(reason) > REASON_MAX:
        refuse(
            f"The reason is too long ({len(reason)} characters; at most {REASON_MAX}).",
            action=action,
            actor=actor,
            **where,
        )
    return reason
