"""Views: permission check, form, one call into the workflow, one template. No rules here."""

import csv
import json
from contextlib import closing

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, Prefetch, Q
from django.core.serializers.json import DjangoJSONEncoder
from django.http import Http404, HttpResponseBadRequest, HttpResponseNotAllowed, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from . import checks, workflow
from .audit_filters import EXPORT_FIELDS, csv_safe, export_row, filter_errors, filtered_events
from .choices import ACTIVE, REPLICA_COLOURS, RUNNING, SCHEDULABLE, ReplicaState, SessionStatus, SwitchMode
from .forms import CancelForm, ReasonForm, ReplicaFilterForm, ScheduleSwitchForm, SessionFilterForm, StartFailbackForm, SwitchForm
from .hypervisors.registry import hypervisor_for
from .models import AuditEvent, FailbackSession, Replica
from .timeline import session_timeline


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


def filtered_replicas(params):
    """(queryset, filters, errors) for the replica list's search, filters and sort; shared by the page and the API.
    A filter that cannot be used (a NUL, too long) is left out, and errors says why."""
    replicas = Replica.objects.select_related("connection").prefetch_related(
        Prefetch("sessions", queryset=FailbackSession.objects.filter(status__in=ACTIVE)), "disks")
    form = ReplicaFilterForm(params)
    form.is_valid()
    q, state, site, host, sort = (form.cleaned_data.get(k) or "" for k in ("q", "state", "site", "host", "sort"))
    if q:
        replicas = replicas.filter(Q(name__icontains=q) | Q(source_name__icontains=q))
    if state in ReplicaState.values:
        replicas = replicas.filter(state=state)
    if site:
        replicas = replicas.filter(site=site)
    if host:
        replicas = replicas.filter(host=host)
    sort = sort or "name"
    filters = {"q": q, "state": state, "site": site, "host": host, "sort": sort}
    return replicas.order_by(REPLICA_SORTS.get(sort, "name"), "pk"), filters, filter_errors(form)


@require_GET
def replica_list(request):
    replicas, filters, errors = filtered_replicas(request.GET)
    page = Paginator(replicas, 50).get_page(request.GET.get("page"))
    _attach_power_states(page.object_list)
    query = request.GET.copy()
    query.pop("page", None)
    facets = Replica.objects.order_by()
    return render(request, "failback/replica_list.html", {
        "page": page, "replicas": page.object_list, "can_operate": _can_operate(request.user), "query": query.urlencode(),
        "filters": filters, "filter_errors": errors, "states": ReplicaState.choices,
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
    running = list(sessions.filter(status__in=RUNNING).order_by("created_at")[:50])
    scheduled = list(sessions.filter(status__in=SCHEDULABLE, switch_mode=SwitchMode.SCHEDULED).order_by("switch_at")[:50])
    waiting = list(sessions.filter(status=SessionStatus.FAILBACK).order_by("phase2_ended_at")[:50])
    ready = list(sessions.filter(status=SessionStatus.READY_TO_SWITCH).order_by("phase1_ended_at")[:50])
    failures = list(sessions.filter(status=SessionStatus.FAILED).order_by("-ended_at")[:10])
    return {
        "states": [(value, label, counts.get(value, 0), REPLICA_COLOURS[value]) for value, label in ReplicaState.choices],
        "running": running, "scheduled": scheduled, "waiting": waiting, "failures": failures, "now": now, "ready": ready,
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


def _start_checks(replica, form):
    """The pre-failback checks for what the form currently says (its initial choices before any input)."""
    def value(name):
        return form.data.get(name) if form.is_bound else form.fields[name].initial

    network_map = {source: (value(field) or None) for source, field in form.nic_fields if source}
    with closing(hypervisor_for(replica)) as hv:
        return checks.before_start(hv, replica, target_host=value("target_host"), target_datastore=value("target_datastore"), network_map=network_map)


@require_GET
def start_failback_checks(request, pk):
    """htmx: the summary's checks, run again for the host, datastore and networks just picked."""
    replica = get_object_or_404(Replica, pk=pk)
    return render(request, "failback/partials/start_checks.html", {"checks": _start_checks(replica, _start_form(request, replica, request.GET))})


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
                bandwidth_mbps=data["bandwidth_mbps"], commit_policy=data["commit_policy"], commit_after_min=data["commit_after_min"],
                override_checks=data["override_checks"],
            )
        except workflow.Refused as refused:
            error = refused.message
        else:
            messages.success(request, f"Failback #{session.pk} of {replica.name} started.")
            return redirect("failback:session", pk=session.pk)
    elif request.method == "POST":
        error = workflow.refuse_input("Start failback refused: please correct the fields marked below ("
                                      + "; ".join(f"{f}: {' '.join(e)}" for f, e in form.errors.items())[:400] + ").",
                                      action="start_failback", actor=request.user, replica=replica)
    elif not _can_operate(request.user):
        error = "You may look, but starting a failback needs the Operator role."
    return render(request, "failback/start_failback.html", {"replica": replica, "form": form, "error": error,
                                                            "can_operate": _can_operate(request.user), "checks": _start_checks(replica, form),
                                                            "can_override": request.user.has_perm(workflow.OVERRIDE_PERMISSION)},
                  status=400 if request.method == "POST" else 200)


def filtered_sessions(params):
    """(sessions newest first, errors), optionally of one status, replica or plan; shared by the page and the API.
    A filter that cannot be used (not a number, beyond the database's integer) is left out, and errors says why."""
    sessions = FailbackSession.objects.select_related("replica", "started_by")
    form = SessionFilterForm(params)
    form.is_valid()
    status, replica, plan = (form.cleaned_data.get(k) for k in ("status", "replica", "plan"))
    if status:
        sessions = sessions.filter(status=status)
    if replica:
        sessions = sessions.filter(replica_id=replica)
    if plan:
        sessions = sessions.filter(plan_id=plan)
    return sessions, filter_errors(form)


@require_GET
def session_list(request):
    sessions, errors = filtered_sessions(request.GET)
    page = page_by_ids(sessions, request.GET.get("page"), 50)
    return render(request, "failback/session_list.html", {"page": page, "filter_errors": errors})


def session_context(session, user, **extra):
    """What the session fragments need; shared by the page, the action responses and the websocket."""
    disks = list(session.disks.all())
    return {
        "session": session,
        "disks": disks,
        "events": list(session.events.order_by("-at", "-id")[:100]),
        "can_operate": _can_operate(user),
        "can_override": user.has_perm(workflow.OVERRIDE_PERMISSION),
        "time_left_s": session.time_left_s(disks),
        "timeline": session_timeline(session),
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


ACTIONS = {"switch", "schedule", "commit", "undo", "cancel", "stop_countdown"}
ACTION_FORMS = {"schedule": ScheduleSwitchForm, "switch": SwitchForm, "cancel": CancelForm}


def session_action(request, pk, action):
    if action not in ACTIONS:
        raise Http404("No such action")
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    get_object_or_404(FailbackSession, pk=pk)
    form = ACTION_FORMS.get(action, ReasonForm)(request.POST)
    error = notice = None
    if not form.is_valid():
        error = workflow.refuse_input("; ".join(f"{form.fields[f].label if f in form.fields else f}: {' '.join(e)}" for f, e in form.errors.items()),
                                      action={"schedule": "schedule_switch", "stop_countdown": "stop_commit_policy"}.get(action, action),
                                      actor=request.user, session=FailbackSession.objects.get(pk=pk))
    else:
        reason = form.cleaned_data["reason"]
        try:
            if action == "switch":
                workflow.switch_now(request.user, pk, reason=reason, override_checks=form.cleaned_data["override_checks"])
                notice = "Switch started: the replica is being stopped."
            elif action == "cancel":
                s = workflow.cancel(request.user, pk, keep_production_vm=form.cleaned_data["keep_production_vm"], reason=reason)
                notice = ("Cancelled." if s.status == "cancelled" else
                          f"Cancelling: the copy stops and the production VM is {'kept for a retry' if s.keep_production_vm else 'deleted'}; the replica keeps running.")
            elif action == "stop_countdown":
                workflow.stop_commit_policy(request.user, pk, reason=reason)
                notice = "Countdown stopped: commit or undo when you are ready."
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
    form, events = filtered_events(request.GET)
    if form.is_bound and not form.is_valid():  # never the whole trail in place of the filtered set asked for
        return HttpResponseBadRequest(f"Export refused: {filter_errors(form)}", content_type="text/plain; charset=utf-8")
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
