"""Views: permission check, form, one call into the workflow, one template. No rules here."""

import csv
import json
from contextlib import closing

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, Prefetch, Q
from django.core.serializers.json import DjangoJSONEncoder
from django.http import Http404, HttpResponseNotAllowed, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from . import workflow
from .choices import ACTIVE, REPLICA_COLOURS, SCHEDULABLE, ReplicaState, SessionStatus, SwitchMode
from .forms import ReasonForm, ScheduleSwitchForm, StartFailbackForm
from .hypervisors.registry import hypervisor_for
from .audit_filters import EXPORT_FIELDS, csv_safe, export_row, filtered_events
from .models import AuditEvent, FailbackSession, Replica


def _can_operate(user):
    return user.has_perm(workflow.OPERATE_PERMISSION)


def _attach_power_states(replicas):
    """The VM's live power state beside our replica state: one platform call per lab/vCenter."""
    platforms = {}
    for replica in replicas:
        platforms.setdefault((replica.platform, replica.connection_id), replica)
    states = {}
    for key, sample in platforms.items():
        try:
            with closing(hypervisor_for(sample)) as hv:
                states[key] = hv.power_states()
        except Exception as exc:  # an unreachable vCenter must not take the page down
            states[key] = exc
    for replica in replicas:
        found = states[(replica.platform, replica.connection_id)]
        replica.power = f"unknown ({found})" if isinstance(found, Exception) else found.get(replica.vm_id, "not found")
    return replicas


REPLICA_SORTS = {"name": "name", "-name": "-name", "state": "state", "host": "host", "site": "site", "updated": "-updated_at"}


@require_GET
def replica_list(request):
    replicas = Replica.objects.select_related("connection").prefetch_related(
        Prefetch("sessions", queryset=FailbackSession.objects.filter(status__in=ACTIVE)), "disks")
    q, state, site, host = (request.GET.get(k, "").strip() for k in ("q", "state", "site", "host"))
    if q:
        replicas = replicas.filter(Q(name__icontains=q) | Q(source_name__icontains=q))
    if state in ReplicaState.values:
        replicas = replicas.filter(state=state)
    if site:
        replicas = replicas.filter(site=site)
    if host:
        replicas = replicas.filter(host=host)
    sort = request.GET.get("sort", "name")
    replicas = replicas.order_by(REPLICA_SORTS.get(sort, "name"), "pk")
    page = Paginator(replicas, 50).get_page(request.GET.get("page"))
    _attach_power_states(page.object_list)
    query = request.GET.copy()
    query.pop("page", None)
    facets = Replica.objects.order_by()
    return render(request, "failback/replica_list.html", {
        "page": page, "replicas": page.object_list, "can_operate": _can_operate(request.user), "query": query.urlencode(),
        "filters": {"q": q, "state": state, "site": site, "host": host, "sort": sort}, "states": ReplicaState.choices,
        "sites": facets.values_list("site", flat=True).distinct(), "hosts": facets.values_list("host", flat=True).distinct(),
    })


@require_GET
def dashboard(request):
    return render(request, "failback/dashboard.html", dashboard_context())


def dashboard_context():
    """What the DR admin watches: states, running work, switches to come, decisions waiting, failures."""
    now = timezone.now()
    counts = dict(Replica.objects.order_by().values_list("state").annotate(n=Count("pk")))
    sessions = FailbackSession.objects.select_related("replica").prefetch_related("disks")
    running = list(sessions.filter(status__in=[SessionStatus.QUEUED, SessionStatus.PHASE1, SessionStatus.SWITCHING,
                                               SessionStatus.COMMITTING, SessionStatus.UNDOING]).order_by("created_at")[:50])
    scheduled = list(sessions.filter(status__in=SCHEDULABLE, switch_mode=SwitchMode.SCHEDULED).order_by("switch_at")[:50])
    waiting = list(sessions.filter(status=SessionStatus.FAILBACK).order_by("phase2_ended_at")[:50])
    failures = list(sessions.filter(status=SessionStatus.FAILED).order_by("-ended_at")[:10])
    return {
        "states": [(value, label, counts.get(value, 0), REPLICA_COLOURS[value]) for value, label in ReplicaState.choices],
        "running": running, "scheduled": scheduled, "waiting": waiting, "failures": failures, "now": now,
        "ready_to_switch": sessions.filter(status=SessionStatus.READY_TO_SWITCH).count(),
    }


def _start_form(request, replica, data=None):
    with closing(hypervisor_for(replica)) as hv:
        placement = hv.placement() if hasattr(hv, "placement") else None
        return StartFailbackForm(data, replica=replica, inventory=hv.inventory(), placement=placement)


@require_GET
def start_failback_pickers(request, pk):
    """htmx: the resource pools that belong to the host just picked."""
    form = _start_form(request, get_object_or_404(Replica, pk=pk), request.GET)
    return render(request, "failback/partials/resource_pool_field.html", {"form": form})


@require_http_methods(["GET", "POST"])
def start_failback(request, pk):
    replica = get_object_or_404(Replica, pk=pk)
    form = _start_form(request, replica, request.POST or None)
    error = None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            session = workflow.start_failback(
                request.user, replica.pk, vm_name=data["vm_name"], target_host=data["target_host"], target_datastore=data["target_datastore"],
                switch_mode=data["switch_mode"], switch_at=data["switch_at"], power_on_after=data["power_on_after"],
                network_map=data["network_map"], reason=data["reason"], resource_pool=data["resource_pool"], folder=data["folder"],
                bandwidth_mbps=data["bandwidth_mbps"],
            )
        except workflow.Refused as refused:
            error = refused.message
        else:
            messages.success(request, f"Failback #{session.pk} of {replica.name} started.")
            return redirect("failback:session", pk=session.pk)
    elif request.method == "POST":
        error = "Please correct the fields marked below."
    elif not _can_operate(request.user):
        error = "You may look, but starting a failback needs the Operator role."
    return render(request, "failback/start_failback.html", {"replica": replica, "form": form, "error": error,
                                                            "can_operate": _can_operate(request.user)},
                  status=400 if request.method == "POST" else 200)


@require_GET
def session_list(request):
    sessions = FailbackSession.objects.select_related("replica", "started_by")
    page = page_by_ids(sessions, request.GET.get("page"), 50)
    return render(request, "failback/session_list.html", {"page": page})


def session_context(session, user, **extra):
    """What the session fragments need; shared by the page, the action responses and the websocket."""
    return {
        "session": session,
        "disks": list(session.disks.all()),
        "events": list(session.events.order_by("-at", "-id")[:100]),
        "can_operate": _can_operate(user),
        "schedule_form": ScheduleSwitchForm(initial={"switch_at": session.switch_at}),
        "reason_form": ReasonForm(),
        "now": timezone.now(),
        **extra,
    }


@require_GET
def session_report(request, pk):
    """The printable record of one session, for the auditor."""
    session = get_object_or_404(FailbackSession.objects.select_related("replica", "started_by"), pk=pk)
    events = list(session.events.order_by("at", "id"))
    started = next((e for e in events if e.action == "start_failback" and e.outcome == "ok"), None)
    deciders = [e for e in events if e.action in ("switch", "commit", "undo") and e.outcome == "ok"]
    return render(request, "failback/session_report.html", {"session": session, "events": events, "disks": list(session.disks.all()),
                                                            "options": started.data if started else {}, "deciders": deciders,
                                                            "refused": [e for e in events if e.outcome == "refused"], "now": timezone.now()})


@require_GET
def session_detail(request, pk):
    session = get_object_or_404(FailbackSession.objects.select_related("replica", "started_by"), pk=pk)
    return render(request, "failback/session_detail.html", session_context(session, request.user))


ACTIONS = {"switch", "schedule", "commit", "undo"}


def session_action(request, pk, action):
    if action not in ACTIONS:
        raise Http404("No such action")
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    get_object_or_404(FailbackSession, pk=pk)
    form = (ScheduleSwitchForm if action == "schedule" else ReasonForm)(request.POST)
    error = notice = None
    if not form.is_valid():
        error = "; ".join(f"{form.fields[f].label if f in form.fields else f}: {' '.join(e)}" for f, e in form.errors.items())
    else:
        reason = form.cleaned_data["reason"]
        try:
            if action == "switch":
                workflow.switch_now(request.user, pk, reason=reason)
                notice = "Switch started: the replica is being stopped."
            elif action == "schedule":
                s = workflow.schedule_switch(request.user, pk, form.cleaned_data["switch_at"], reason=reason)
                notice = f"Switch scheduled for {timezone.localtime(s.switch_at):%Y-%m-%d %H:%M %Z}."
            elif action == "commit":
                workflow.commit(request.user, pk, reason=reason)
                notice = "Commit started."
            else:
                workflow.undo(request.user, pk, reason=reason)
                notice = "Undo started: going back to the replica."
        except workflow.Refused as refused:
            error = refused.message
    session = FailbackSession.objects.select_related("replica", "started_by").get(pk=pk)
    status = 200 if error is None else (400 if not form.is_valid() else 409)
    if request.htmx:
        return render(request, "failback/partials/session_actions.html", session_context(session, request.user, error=error, notice=notice), status=status)
    (messages.error if error else messages.success)(request, error or notice)
    return redirect("failback:session", pk=pk)


def page_by_ids(queryset, number, per_page):
    """Paginate over primary keys, then fetch the page's rows: a deep OFFSET then skips bare index
    entries instead of building (and joining) every skipped row."""
    page = Paginator(queryset.values_list("pk", flat=True), per_page).get_page(number)
    rows = {row.pk: row for row in queryset.filter(pk__in=list(page.object_list))}
    page.object_list = [rows[pk] for pk in page.object_list]
    return page


@require_GET
def audit_list(request):
    form, events = filtered_events(request.GET)
    page = page_by_ids(events, request.GET.get("page"), 100)
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "failback/audit_list.html", {"page": page, "form": form, "query": query.urlencode()})


@require_GET
def audit_export(request, fmt):
    """The filtered set, whole, as CSV (formula-safe) or JSON; streamed, so big exports stay small in memory."""
    if fmt not in ("csv", "json"):
        raise Http404("Export as csv or json")
    _, events = filtered_events(request.GET)
    rows = (export_row(e) for e in events.iterator(chunk_size=2000))
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    if fmt == "csv":
        buffer = Echo()
        writer = csv.writer(buffer)

        def lines():
            yield writer.writerow(EXPORT_FIELDS)
            for row in rows:
                yield writer.writerow([csv_safe(json.dumps(row[f]) if f == "data" else row[f]) for f in EXPORT_FIELDS])

        response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    else:
        def items():
            yield "["
            for i, row in enumerate(rows):
                yield ("," if i else "") + json.dumps(row, cls=DjangoJSONEncoder)
            yield "]"

        response = StreamingHttpResponse(items(), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.{fmt}"'
    return response


class Echo:
    def write(self, value):
        return value
