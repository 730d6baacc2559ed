"""The API's approvals: requests waiting for a second person, and their approval or rejection.

An action endpoint whose action needs approval answers 202 with the request (``ApprovalOut``) instead
of acting; another person then approves it here and it runs as the requester's (rules in approvals.py).
"""

from datetime import datetime
from typing import Annotated

from ninja import Field, Path, Router, Schema

from . import approvals
from .api_schemas import DB_INT_MAX, Error, Reason, ValidationProblem
from .models import ApprovalRequest

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


router = Router(tags=["approvals"])


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
