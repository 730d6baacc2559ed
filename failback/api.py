"""The /api/v1/ automation API (django-ninja): the portal's reads and actions for scripts.

Authentication is a personal bearer token (``Authorization: Bearer drp_…``, see failback.tokens); the
session cookie is not accepted, so the API needs no CSRF token. The request acts as the token's user, with
that user's role. Every action calls the same service function as the page's button (workflow.py,
plans.py), which checks the role and the state and writes the audit trail; a refusal becomes 403 (role)
or 409 (state), with the message the page would show. Unknown ids are 404, malformed input 422.

Lists take the pages' filters and ``limit``/``offset`` (newest first, or the page's sort). A page's rows
are fetched by primary key after slicing the ids, as the pages do, so deep offsets stay cheap.
"""

import functools
import json
import re
from contextlib import closing
from typing import Annotated, Literal

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import RequestDataTooBig
from ninja import NinjaAPI, Path, Query, Status
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser
from ninja.security import HttpBearer

from . import actions, approvals, hooks, plans, tokens, windows, workflow
from . import api_render as render
from .api_approvals import ApprovalOut
from .api_approvals import out as approval_out
from .api_approvals import router as approvals_router
from .api_schemas import (
    DB_INT_MAX,
    AuditFilters,
    AuditPage,
    CancelIn,
    Error,
    HooksOut,
    PlanOut,
    PlanPage,
    ReasonIn,
    ReplicaOut,
    ReplicaPage,
    ScheduleIn,
    SessionOut,
    SessionPage,
    StartFailbackIn,
    StartPlanIn,
    SwitchIn,
    TargetsOut,
    ValidationProblem,
    WindowsIn,
)
from .audit_filters import export_row, filtered_events
from .choices import ReplicaState, SessionStatus
from .forms import suggest_network
from .hypervisors.base import HypervisorError
from .hypervisors.registry import hypervisor_for
from .models import FailbackPlan, FailbackSession, Replica
from .queries import REPLICA_SORTS, filtered_replicas, filtered_sessions
from .views_evidence import evidence_response


class BearerToken(HttpBearer):
    def authenticate(self, request, token):
        user = tokens.authenticate(token)
        if user is not None:
            request.user = user  # the session cookie's user, if any, is ignored
        return user


class PortalAPI(NinjaAPI):
    def get_openapi_operation_id(self, operation):
        return operation.view_func.__name__  # "switch_now", not "failback_api_switch_now"


class ObjectParser(Parser):
    """A request body is a JSON object (or nothing): an array, a string or null is refused, not taken as no options."""

    def parse_body(self, request):
        data = json.loads(request.body)
        if not isinstance(data, dict):
            raise ValueError(f"it is a JSON {type(data).__name__.replace('NoneType', 'null')}")
        return data


api = PortalAPI(
    title="DR portal automation API",
    version="1",
    description="Failback of DR replicas: list and read replicas, sessions, plans and the audit trail; start, switch, "
    "schedule, cancel, commit and undo; set up vCenter connections and declare failovers. Authenticate with a personal token: `Authorization: Bearer drp_…` "
    "(create one on the portal's API tokens page or with `manage.py create_api_token`).",
    urls_namespace="api-v1",
    openapi_url="/schema/",
    docs_url="/docs",
    auth=BearerToken(),
    parser=ObjectParser(),
)

READ = {401: Error, 422: ValidationProblem}
ONE = {**READ, 404: Error}
ACT = {
    **ONE,
    400: Error,
    403: Error,
    409: Error,
    413: Error,
}  # 400: the body is not a JSON object; 413: it is too large
ASK = {**ACT, 202: ApprovalOut}  # an action that may need approval: 202, it waits for a second person
Limit = Query(50, ge=1, le=500, description="Rows per page (at most 500)")
Offset = Query(0, ge=0, le=DB_INT_MAX, description="Rows to skip")
PathId = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="An id (404 when there is none)")]


# -- refusals: each on the record, as the pages' are --------------------------------------------------
# Every action endpoint names the action its service call audits (``x-audit-action`` in the OpenAPI schema).
# A call refused before the service is reached (the schema's validation, a body that is not JSON or too
# large) is audited under that name too, once, by the token's user; reads and anonymous calls are not.


def _audited(action):
    return {"openapi_extra": {"x-audit-action": action}}


@functools.cache
def _audit_actions():
    """{(method, path template): audit action} from the API's own OpenAPI schema."""
    paths = api.get_openapi_schema()["paths"]
    return {
        (method.upper(), path): op["x-audit-action"]
        for path, ops in paths.items()
        for method, op in ops.items()
        if "x-audit-action" in op
    }


def _refuse_request(request, problem, errors=()):
    """Audit the refusal of a request to an action endpoint by an authenticated caller (nothing for a read)."""
    match, actor = request.resolver_match, getattr(request, "auth", None)
    if match is None or actor is None:
        return
    action = _audit_actions().get((request.method, "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", match.route)))
    if action is None:
        return
    where = {"data": {"errors": list(errors)} if errors else {}}
    ids = {
        name: int(value)
        for name, value in match.kwargs.items()
        if str(value).isdecimal() and 0 < int(value) <= DB_INT_MAX
    }
    if "session_id" in ids:
        where["session"] = FailbackSession.objects.filter(pk=ids["session_id"]).first()
    if "replica_id" in ids:
        where["replica"] = Replica.objects.filter(pk=ids["replica_id"]).first()
    if "plan_id" in ids:
        where["data"]["plan_id"] = ids["plan_id"]
    if "connection_id" in ids:
        where["data"]["connection_id"] = ids["connection_id"]
    message = f"{action.replace('_', ' ').capitalize()} refused: {problem}"
    workflow.refuse_input(message[:2000], action=action, actor=actor, **where)


def _field(loc):
    """pydantic's ("body", "body", "members", 0, "replica_id") as the field a caller wrote: members.0.replica_id."""
    parts = list(loc[2:] if tuple(loc[:2]) == ("body", "body") else loc[1:])
    return ".".join(str(p) for p in parts)


@api.exception_handler(ValidationError)
def invalid(request, exc):
    """422 in pydantic's format; an action's refusal is audited with each field and why (never the value sent)."""
    errors = [{"loc": _field(e["loc"]), "msg": e["msg"]} for e in exc.errors]
    _refuse_request(request, "invalid input (" + "; ".join(f"{e['loc']}: {e['msg']}" for e in errors) + ").", errors)
    return api.create_response(request, {"detail": exc.errors}, status=422)


@api.exception_handler(HttpError)
def http_error(request, exc):
    """Ninja's 400 for a body it could not parse (raised from the parser's error) says why; the others as raised."""
    if exc.status_code != 400 or exc.__cause__ is None:
        return api.create_response(request, {"detail": str(exc)}, status=exc.status_code)
    problem = f"The request body is not a JSON object ({exc.__cause__})."
    _refuse_request(request, problem[0].lower() + problem[1:])
    return api.create_response(request, {"detail": problem}, status=400)


@api.exception_handler(RequestDataTooBig)
def too_big(request, exc):
    """A body over DATA_UPLOAD_MAX_MEMORY_SIZE: 413 in JSON (Django's own answer is an HTML 400 and a traceback)."""
    problem = f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
    _refuse_request(request, problem[0].lower() + problem[1:])
    return api.create_response(request, {"detail": problem}, status=413)


@api.exception_handler(approvals.ApprovalRequested)
def approval_requested(request, exc):
    """Not done yet: the action waits for a second person (the request says which)."""
    return api.create_response(request, approval_out(exc.request, exc.message), status=202)


@api.exception_handler(workflow.Refused)
def refused(request, exc):
    """The service layer said no (and audited it): the role is 403, anything else a conflict with the state."""
    return api.create_response(request, {"detail": exc.message}, status=403 if exc.forbidden else 409)


@api.exception_handler(HypervisorError)
def platform_failed(request, exc):
    """The lab or vCenter failed or refused; its own message says why."""
    return api.create_response(request, {"detail": f"The platform failed: {exc}"}, status=502)


@api.exception_handler(AuthenticationError)
def unauthenticated(request, exc):
    response = api.create_response(
        request, {"detail": "A valid API token is needed: Authorization: Bearer <token>."}, status=401
    )
    response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


def _page(queryset, limit, offset, render):
    ids = list(queryset.values_list("pk", flat=True)[offset : offset + limit])
    rows = queryset.in_bulk(ids)
    return {"count": queryset.count(), "limit": limit, "offset": offset, "items": render([rows[pk] for pk in ids])}


def _one(queryset, pk, what):
    row = queryset.filter(pk=pk).first()
    if row is None:
        raise HttpError(404, f"There is no {what} #{pk}.")
    return row


# -- reads -------------------------------------------------------------------------------------------


@api.get(
    "/replicas",
    response={200: ReplicaPage, **READ},
    tags=["replicas"],
    summary="List replicas (the replica page's search, filters and sort)",
)
def list_replicas(
    request,
    q: str = Query("", max_length=200, pattern=r"^[^\x00]*$", description="Name or source name contains"),
    state: ReplicaState | None = None,
    site: str = Query("", max_length=100, pattern=r"^[^\x00]*$"),
    host: str = Query("", max_length=200, pattern=r"^[^\x00]*$"),
    sort: Literal[tuple(REPLICA_SORTS)] = "name",
    limit: int = Limit,
    offset: int = Offset,
):
    replicas, _, _ = filtered_replicas({"q": q, "state": state or "", "site": site, "host": host, "sort": sort})
    return _page(replicas, limit, offset, render.replicas)


@api.get("/replicas/{replica_id}", response={200: ReplicaOut, **ONE}, tags=["replicas"], summary="One replica")
def get_replica(request, replica_id: PathId):
    return render.replicas([_one(filtered_replicas({})[0], replica_id, "replica")])[0]


@api.get(
    "/replicas/{replica_id}/targets",
    response={200: TargetsOut, **ONE, 502: Error},
    tags=["replicas"],
    summary="Where the replica can fail back to: hosts, datastores, networks, and the network map the start form suggests",
)
def replica_targets(request, replica_id: PathId):
    replica = _one(Replica.objects, replica_id, "replica")
    with closing(hypervisor_for(replica)) as hv:
        inventory = hv.inventory()
        placement = hv.placement()
    config = next((vm for vm in inventory.vms if vm.vm_id == replica.vm_id), None)
    nics = [
        {"key": n.key, "network": n.network, "suggested": suggest_network(n.network, inventory.networks) or None}
        for n in (config.nics if config else ())
    ]
    return {
        "hosts": list(inventory.hosts),
        "datastores": [{"name": n, "free_bytes": free} for n, free in inventory.datastores.items()],
        "networks": list(inventory.networks),
        "nics": nics,
        "suggested_network_map": {n["network"]: n["suggested"] for n in nics if n["network"]},
        "resource_pools": dict(placement.resource_pools) if placement else {},
        "folders": dict(placement.folders) if placement else {},
    }


@api.get(
    "/sessions", response={200: SessionPage, **READ}, tags=["sessions"], summary="List failback sessions, newest first"
)
def list_sessions(
    request,
    status: SessionStatus | None = None,
    replica: int | None = Query(None, ge=1, le=DB_INT_MAX),
    plan: int | None = Query(None, ge=1, le=DB_INT_MAX),
    limit: int = Limit,
    offset: int = Offset,
):
    sessions, _ = filtered_sessions(
        {"status": status or "", "replica": str(replica or ""), "plan": str(plan or "")}
    )  # typed and bounded above
    return _page(sessions.prefetch_related("disks", render.pending_approvals()), limit, offset, render.sessions)


@api.get(
    "/sessions/{session_id}",
    response={200: SessionOut, **ONE},
    tags=["sessions"],
    summary="One failback session, with its disks",
)
def get_session(request, session_id: PathId):
    return render.session(_one(render.session_rows(), session_id, "failback"))


@api.get(
    "/sessions/{session_id}/evidence",
    response={200: dict, **ONE},
    tags=["sessions"],
    summary="The session's signed evidence file (Ed25519), byte for byte what manage.py verify_evidence checks",
)
def get_evidence(request, session_id: PathId):
    return evidence_response(
        _one(FailbackSession.objects.select_related("replica", "started_by", "plan"), session_id, "failback")
    )


@api.get(
    "/hooks",
    response={200: HooksOut, 401: Error, 409: Error},
    tags=["hooks"],
    summary="The hooks a failback may name (the allow-list), and the points they run at",
)
def list_hooks(request):
    try:
        allowed = hooks.allowed()
    except hooks.HookConfigError as exc:
        raise HttpError(409, f"The hooks allow-list cannot be used: {exc}.") from None
    return {
        "points": hooks.POINTS,
        "hooks": [
            {
                "name": h.name,
                "timeout_s": h.timeout_s,
                "on_error": h.on_error,
                "default_points": list(h.default_points),
                "replicas": list(h.replicas),
            }
            for h in allowed.values()
        ],
    }


@api.get("/plans", response={200: PlanPage, **READ}, tags=["plans"], summary="List failback plans, newest first")
def list_plans(request, limit: int = Limit, offset: int = Offset):
    return _page(render.plan_rows(), limit, offset, render.plans)


@api.get(
    "/plans/{plan_id}",
    response={200: PlanOut, **ONE},
    tags=["plans"],
    summary="One plan, with its members in boot order",
)
def get_plan(request, plan_id: PathId):
    return render.plans([_one(render.plan_rows(), plan_id, "plan")])[0]


@api.get(
    "/audit",
    response={200: AuditPage, **READ},
    tags=["audit"],
    summary="The audit trail, newest first (the audit page's filters)",
)
def list_audit(request, filters: Query[AuditFilters], limit: int = Limit, offset: int = Offset):
    params = {k: str(v) for k, v in filters.dict().items() if v not in (None, "")}
    form, events = filtered_events(params)
    if form.is_bound and not form.is_valid():
        raise ValidationError(
            [
                {"loc": ["query", field], "msg": " ".join(messages), "type": "value_error"}
                for field, messages in form.errors.items()
            ]
        )
    return _page(events, limit, offset, lambda rows: [{"id": e.pk, **export_row(e)} for e in rows])


# -- actions: each one service call --------------------------------------------------------------------


@api.post(
    "/replicas/{replica_id}/failback",
    response={201: SessionOut, **ACT, 502: Error},
    tags=["actions"],
    **_audited("start_failback"),
    summary="Start a failback of one replica in Failover (phase 1 is queued)",
)
def start_failback(request, replica_id: PathId, body: StartFailbackIn):
    _one(Replica.objects, replica_id, "replica")
    session = workflow.start_failback(request.auth, replica_id, workflow.StartOptions(**body.dict()))
    return Status(201, render.fresh_session(session.pk))


@api.post(
    "/sessions/{session_id}/switch",
    response={200: SessionOut, **ASK},
    tags=["actions"],
    **_audited("switch"),
    summary="Switch now (phase 2)",
)
def switch_now(request, session_id: PathId, body: SwitchIn):
    _one(FailbackSession.objects, session_id, "failback")
    actions.perform("switch", request.auth, session_id, body.dict())
    return render.fresh_session(session_id)


@api.post(
    "/sessions/{session_id}/schedule",
    response={200: SessionOut, **ASK},
    tags=["actions"],
    **_audited("schedule_switch"),
    summary="Schedule or change the switch time",
)
def schedule_switch(request, session_id: PathId, body: ScheduleIn):
    _one(FailbackSession.objects, session_id, "failback")
    actions.perform("schedule", request.auth, session_id, body.dict())
    return render.fresh_session(session_id)


@api.post(
    "/sessions/{session_id}/windows",
    response={200: SessionOut, **ACT},
    tags=["actions"],
    **_audited("set_switch_windows"),
    summary="Set maintenance windows and a downtime budget: the switch starts in a window when the downtime fits",
)
def set_windows(request, session_id: PathId, body: WindowsIn):
    _one(FailbackSession.objects, session_id, "failback")
    rules = [w.dict() for w in body.windows]
    windows.set_session_rules(
        request.auth, session_id, windows=rules, budget_s=body.downtime_budget_s, reason=body.reason
    )
    return render.fresh_session(session_id)


@api.post(
    "/sessions/{session_id}/cancel",
    response={200: SessionOut, **ASK},
    tags=["actions"],
    **_audited("cancel"),
    summary="Cancel before the switch (the replica keeps running)",
)
def cancel(request, session_id: PathId, body: CancelIn):
    _one(FailbackSession.objects, session_id, "failback")
    actions.perform("cancel", request.auth, session_id, body.dict())
    return render.fresh_session(session_id)


@api.post(
    "/sessions/{session_id}/stop-commit-policy",
    response={200: SessionOut, **ACT},
    tags=["actions"],
    **_audited("stop_commit_policy"),
    summary="Stop the automatic commit or undo countdown",
)
def stop_commit_policy(request, session_id: PathId, body: ReasonIn):
    _one(FailbackSession.objects, session_id, "failback")
    actions.perform("stop_commit_policy", request.auth, session_id, body.dict())
    return render.fresh_session(session_id)


@api.post(
    "/sessions/{session_id}/commit",
    response={200: SessionOut, **ASK},
    tags=["actions"],
    **_audited("commit"),
    summary="Commit: keep production",
)
def commit(request, session_id: PathId, body: ReasonIn):
    _one(FailbackSession.objects, session_id, "failback")
    actions.perform("commit", request.auth, session_id, body.dict())
    return render.fresh_session(session_id)


@api.post(
    "/sessions/{session_id}/undo",
    response={200: SessionOut, **ASK},
    tags=["actions"],
    **_audited("undo"),
    summary="Undo: back to the replica (production's changes since the switch are discarded)",
)
def undo(request, session_id: PathId, body: ReasonIn):
    _one(FailbackSession.objects, session_id, "failback")
    actions.perform("undo", request.auth, session_id, body.dict())
    return render.fresh_session(session_id)


@api.post(
    "/plans",
    response={201: PlanOut, **ACT, 502: Error},
    tags=["actions"],
    **_audited("start_plan"),
    summary="Start a plan: several replicas, one switch, power-on in order",
)
def start_plan(request, body: StartPlanIn):
    plan = plans.start_plan(request.auth, **body.dict())
    return Status(201, render.fresh_plan(plan.pk))


@api.post(
    "/plans/{plan_id}/switch",
    response={200: PlanOut, **ACT},
    tags=["actions"],
    **_audited("switch_plan"),
    summary="Switch every member now (when all are Ready to switch), in boot order",
)
def switch_plan(request, plan_id: PathId, body: ReasonIn):
    _one(FailbackPlan.objects, plan_id, "plan")
    plans.switch_now(request.auth, plan_id, reason=body.reason)
    return render.fresh_plan(plan_id)


@api.post(
    "/plans/{plan_id}/commit",
    response={200: PlanOut, **ACT},
    tags=["actions"],
    **_audited("commit_plan"),
    summary="Commit every member in Failback",
)
def commit_plan(request, plan_id: PathId, body: ReasonIn):
    _one(FailbackPlan.objects, plan_id, "plan")
    plans.commit(request.auth, plan_id, reason=body.reason)
    return render.fresh_plan(plan_id)


@api.post(
    "/plans/{plan_id}/undo",
    response={200: PlanOut, **ACT},
    tags=["actions"],
    **_audited("undo_plan"),
    summary="Undo every member in Failback",
)
def undo_plan(request, plan_id: PathId, body: ReasonIn):
    _one(FailbackPlan.objects, plan_id, "plan")
    plans.undo(request.auth, plan_id, reason=body.reason)
    return render.fresh_plan(plan_id)


@api.post(
    "/plans/{plan_id}/schedule",
    response={200: PlanOut, **ACT},
    tags=["actions"],
    **_audited("schedule_plan_switch"),
    summary="Schedule or change the plan's switch time",
)
def schedule_plan(request, plan_id: PathId, body: ScheduleIn):
    _one(FailbackPlan.objects, plan_id, "plan")
    plans.schedule_switch(request.auth, plan_id, body.switch_at, reason=body.reason)
    return render.fresh_plan(plan_id)


@api.post(
    "/plans/{plan_id}/windows",
    response={200: PlanOut, **ACT},
    tags=["actions"],
    **_audited("set_switch_windows"),
    summary="Set the plan's maintenance windows and downtime budget (every member's downtime must fit)",
)
def set_plan_windows(request, plan_id: PathId, body: WindowsIn):
    _one(FailbackPlan.objects, plan_id, "plan")
    rules = [w.dict() for w in body.windows]
    windows.set_plan_rules(request.auth, plan_id, windows=rules, budget_s=body.downtime_budget_s, reason=body.reason)
    return render.fresh_plan(plan_id)


from . import api_connections  # noqa: E402, F401 (registers the vCenter set-up endpoints on ``api``)

api.add_router("/approvals", approvals_router)


def urls():
    """The API's URL patterns. Token auth replaces the login redirect of LoginRequiredMiddleware here."""
    patterns, app_name, namespace = api.urls
    for pattern in patterns:
        login_not_required(pattern.callback)
    return patterns, app_name, namespace
