"""The API's approvals: requests waiting for a second person, and their approval or rejection.

An action endpoint whose action needs approval answers 202 with the request (``ApprovalOut``) instead
of acting; another person then approves it here and it runs as the requester's (rules in approvals.py).
"""

from datetime import datetime
from typing import Annotated

from ninja import Field, Path, Router, Schema
from ninja.errors import HttpError

from . import approvals
from .api_schemas import DB_INT_MAX, Error, Reason, ValidationProblem
from .choices import Approvable
from .models import ApprovalRequest, ApprovalRule, FailbackPlan

RequestId = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="An approval request's id")]
DECIDE = {401: Error, 403: Error, 400: Error, 409: Error, 413: Error, 422: ValidationProblem}


class ApprovalOut(Schema):
    id: int
    session_id: int
    action: str = Field(description="switch, schedule_switch, commit, undo or cancel")
    params: dict = Field(description="The action's own arguments, as asked for")
    status: str = Field(description="pending, done, failed (approved, then refused when run), rejected or expired")
    requested_by: str | None = Field(description="Who asked; null when the portal itself asked")
    requested_at: datetime
    expires_at: datetime
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str
    result: str
    detail: str = Field(default="", description="What happened, in the words the portal shows people")


class DecisionIn(Schema):
    reason: Reason = ""


def out(request, detail=""):
    return {
        "id": request.pk,
        "session_id": request.session_id,
        "action": request.action,
        "params": request.params,
        "status": request.status,
        "requested_by": request.requested_by.get_username() if request.requested_by_id else None,
        "requested_at": request.requested_at,
        "expires_at": request.expires_at,
        "decided_by": request.decided_by.get_username() if request.decided_by_id else None,
        "decided_at": request.decided_at,
        "decision_reason": request.decision_reason,
        "result": request.result,
        "detail": detail,
    }


class RuleOut(Schema):
    action: Approvable = Field(description="The action that needs a second person's approval")
    plan_id: int | None = Field(description="null: on every failback; else only on this plan's members and switch")
    plan_name: str | None
    created_by: str
    created_at: datetime


class RuleIn(Schema):
    action: Approvable
    required: bool = Field(default=True, description="false stops requiring it")
    plan_id: int | None = Field(default=None, ge=1, le=DB_INT_MAX, description="null: every failback")


def rules_out():
    rows = ApprovalRule.objects.select_related("plan", "created_by").order_by("action", "plan_id")
    return [
        {
            "action": r.action,
            "plan_id": r.plan_id,
            "plan_name": r.plan.name if r.plan_id else None,
            "created_by": r.created_by.get_username(),
            "created_at": r.created_at,
        }
        for r in rows
    ]


router = Router(tags=["approvals"])


@router.get(
    "/rules", response={200: list[RuleOut], 401: Error}, summary="Which actions need a second person's approval"
)
def list_rules(request):
    return rules_out()


@router.post(
    "/rules",
    response={200: list[RuleOut], 404: Error, **DECIDE},
    summary="Require (or stop requiring) approval for an action, on every failback or one plan (Administrators)",
)
def set_rule(request, body: RuleIn):
    plan = None
    if body.plan_id is not None:
        plan = FailbackPlan.objects.filter(pk=body.plan_id).first()
        if plan is None:
            raise HttpError(404, f"There is no plan #{body.plan_id}.")
    approvals.set_rule(request.auth, body.action, required=body.required, plan=plan)
    return rules_out()


@router.get(
    "",
    response={200: list[ApprovalOut], 401: Error},
    summary="Approval requests: waiting ones first, then the last 100 decided",
)
def list_approvals(request):
    approvals.expire_due()
    rows = ApprovalRequest.objects.select_related("requested_by", "decided_by")
    pending = list(rows.filter(status=ApprovalRequest.Status.PENDING).order_by("expires_at"))
    decided = list(rows.exclude(status=ApprovalRequest.Status.PENDING)[:100])
    return [out(r) for r in pending + decided]


@router.post(
    "/{request_id}/approve", response={200: ApprovalOut, **DECIDE}, summary="Approve a request: its action runs now"
)
def approve(request, request_id: RequestId, body: DecisionIn):
    row = approvals.approve(request.auth, request_id, reason=body.reason)
    return out(row, row.result)


@router.post(
    "/{request_id}/reject",
    response={200: ApprovalOut, **DECIDE},
    summary="Reject (or, as its requester, withdraw) a request",
)
def reject(request, request_id: RequestId, body: DecisionIn):
    return out(approvals.reject(request.auth, request_id, reason=body.reason))
