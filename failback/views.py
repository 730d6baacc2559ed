"""Views: permission check, form, one call into the workflow, one template. No rules here."""

import csv
import json
from contextlib import closing

from django.conf import settings
from django.contrib import messages
from django.core.serializers.json import DjangoJSONEncoder
from django.http import Http404, HttpResponseBadRequest, HttpResponseNotAllowed, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from . import checks, evidence, rehearsal, starting, workflow
from .actions import ACTIONS
from .audit_filters import (
    EXPORT_FIELDS,
    csv_safe,
    event_rows,
    export_row,
    filter_errors,
    filtered_events,
    trail_count,
    unfiltered,
)
from .choices import ReplicaState
from .forms import StartFailbackForm
from .hypervisors.registry import hypervisor_for
from .models import FailbackSession, Replica
from .presenters import can_operate, dashboard_context, session_context
from .queries import attach_power_states, filtered_replicas, filtered_sessions, page_by_ids


@require_GET
def replica_list(request):
    replicas, filters, errors = filtered_replicas(request.GET)
    page = page_by_ids(replicas, request.GET.get("page"), 50)
    attach_power_states(page.object_list)
    may_power = rehearsal.may_power(request.user)
    for r in page.object_list:
        r.lab_power = rehearsal.power_offer(r, r.power) if may_power else None
    query = request.GET.copy()
    query.pop("page", None)
    facets = list(Replica.objects.order_by().values_list("site", "host").distinct())  # both filters' choices at once
    return render(
        request,
        "failback/replica_list.html",
        {
            "page": page,
            "replicas": page.object_list,
            "can_operate": can_operate(request.user),
            "query": query.urlencode(),
            "filters": filters,
            "filter_errors": errors,
            "states": ReplicaState.choices,
            "sites": sorted({site for site, _ in facets}),
            "hosts": sorted({host for _, host in facets}),
        },
    )


@require_http_methods(["POST"])
def lab_power(request, pk, to):
    """Power a lab replica's VM on or off (Administrators; the rules are in rehearsal.lab_power)."""
    if to not in rehearsal.POWER_ACTIONS:
        raise Http404("Power on or off")
    try:
        power = rehearsal.lab_power(request.user, pk, to, reason=request.POST.get("reason", ""))
        messages.success(request, f"{Replica.objects.get(pk=pk).name} is {power}.")
    except workflow.Refused as refused:
        messages.error(request, refused.message)
    back = request.POST.get("next", "")
    return redirect(back if back.startswith("/replicas/?") else "failback:replicas")


@require_GET
def dashboard(request):
    return render(request, "failback/dashboard.html", dashboard_context())


def _start_form(request, replica, data=None):
    with closing(hypervisor_for(replica)) as hv:
        placement = hv.placement()
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
        return checks.before_start(
            hv,
            replica,
            target_host=value("target_host"),
            target_datastore=value("target_datastore"),
            network_map=network_map,
        )


@require_GET
def start_failback_checks(request, pk):
    """htmx: the summary's checks, run again for the host, datastore and networks just picked."""
    replica = get_object_or_404(Replica, pk=pk)
    return render(
        request,
        "failback/partials/start_checks.html",
        {"checks": _start_checks(replica, _start_form(request, replica, request.GET))},
    )


@require_http_methods(["GET", "POST"])
def start_failback(request, pk):
    replica = get_object_or_404(Replica, pk=pk)
    form = _start_form(request, replica, request.POST or None)
    error, step = None, request.POST.get("step")
    if request.method == "POST" and form.is_valid() and step in ("review", "edit"):
        return _start_review(request, replica, form, review=step == "review")
    if request.method == "POST" and form.is_valid():
        try:
            session = workflow.start_failback(request.user, replica.pk, form.options())
        except workflow.Refused as refused:
            error = refused.message
        else:
            messages.success(request, f"Failback #{session.pk} of {replica.name} started.")
            return redirect("failback:session", pk=session.pk)
    elif request.method == "POST":
        error = workflow.refuse_input(
            "Start failback refused: please correct the fields marked below ("
            + "; ".join(f"{f}: {' '.join(e)}" for f, e in form.errors.items())[:400]
            + ").",
            action="start_failback",
            actor=request.user,
            replica=replica,
        )
    elif not can_operate(request.user):
        error = "You may look, but starting a failback needs the Operator role."
    return render(
        request,
        "failback/start_failback.html",
        {
            "replica": replica,
            "form": form,
            "error": error,
            "can_operate": can_operate(request.user),
            "checks": _start_checks(replica, form),
            "can_override": request.user.has_perm(workflow.OVERRIDE_PERMISSION),
        },
        status=400 if request.method == "POST" else 200,
    )


def _start_review(request, replica, form, *, review):
    """The wizard's review step (everything the start will do, and the checks), or the form again to change it."""
    context = {
        "replica": replica,
        "form": form,
        "can_operate": can_operate(request.user),
        "checks": _start_checks(replica, form),
        "can_override": request.user.has_perm(workflow.OVERRIDE_PERMISSION),
        "review": starting.review(replica, form.options()) if review else None,
    }
    return render(request, "failback/start_failback.html", context)


SESSION_ROW_FIELDS = (
    *("status", "vm_name", "target_host", "switch_mode", "switch_at", "created_at"),
    *("replica__name", "started_by__username"),
)


@require_GET
def session_list(request):
    sessions, errors = filtered_sessions(request.GET)
    # Only the columns the rows show (a session has a dozen timestamps and its throughput samples besides).
    sessions = sessions.only(*SESSION_ROW_FIELDS)
    page = page_by_ids(sessions, request.GET.get("page"), 50)
    return render(request, "failback/session_list.html", {"page": page, "filter_errors": errors})


@require_GET
def session_report(request, pk):
    """The printable record of one session, for the auditor."""
    session = get_object_or_404(FailbackSession.objects.select_related("replica", "started_by"), pk=pk)
    events = list(session.events.order_by("at", "id"))
    started = next((e for e in events if e.action == "start_failback" and e.outcome == "ok"), None)
    deciders = [e for e in events if e.action in ("switch", "commit", "undo") and e.outcome == "ok"]
    return render(
        request,
        "failback/session_report.html",
        {
            "session": session,
            "events": events,
            "disks": list(session.disks.all()),
            "options": started.data if started else {},
            "deciders": deciders,
            "refused": [e for e in events if e.outcome == "refused"],
            "now": timezone.now(),
            "evidence": evidence.summary(evidence.document(session)),
        },
    )


@require_GET
def session_detail(request, pk):
    session = get_object_or_404(FailbackSession.objects.select_related("replica", "started_by", "plan"), pk=pk)
    return render(request, "failback/session_detail.html", session_context(session, request.user))


def session_action(request, pk, action):
    spec = ACTIONS.get(action)
    if spec is None:
        raise Http404("No such action")
    if request.method == "GET":  # the dialog that states the consequence and asks for the reason
        return session_action_dialog(request, pk, spec)
    if request.method != "POST":
        return HttpResponseNotAllowed(["GET", "POST"])
    session = get_object_or_404(FailbackSession, pk=pk)
    form = spec.form(request.POST)
    error = notice = None
    if not form.is_valid():
        problems = "; ".join(
            f"{form.fields[f].label if f in form.fields else f}: {' '.join(e)}" for f, e in form.errors.items()
        )
        error = workflow.refuse_input(problems, action=spec.guard, actor=request.user, session=session)
    else:
        try:
            notice = spec.notice(spec.perform(request.user, pk, form.cleaned_data))
        except workflow.Refused as refused:
            error = refused.message
    session = FailbackSession.objects.select_related("replica", "started_by").get(pk=pk)
    status = 200 if error is None else (400 if not form.is_valid() else 409)
    if request.htmx:
        context = session_context(session, request.user, error=error, notice=notice)
        return render(request, "failback/partials/session_actions.html", context, status=status)
    (messages.error if error else messages.success)(request, error or notice)
    return redirect("failback:session", pk=pk)


def session_action_dialog(request, pk, spec):
    """The action's dialog (htmx puts it in the page's <dialog>); without JavaScript, a page of its own."""
    session = get_object_or_404(FailbackSession.objects.select_related("replica"), pk=pk)
    context = {
        "session": session,
        "dialog": spec.dialog(session, request.GET),
        "can_override": request.user.has_perm(workflow.OVERRIDE_PERMISSION),
    }
    if not (can_operate(request.user) and session.may(spec.guard)):
        context["dialog"]["problems"].append(f"{spec.render(spec.button, session)} is not possible now.")
    template = "failback/partials/action_dialog.html" if request.htmx else "failback/session_action.html"
    return render(request, template, context)


@require_GET
def audit_list(request):
    form, events = filtered_events(request.GET)
    page = page_by_ids(
        events,
        request.GET.get("page"),
        100,
        count=trail_count() if unfiltered(form) else None,
        rows_from=event_rows(),  # the ids came through the filters
        count_limit=settings.FAILBACK_AUDIT_COUNT_LIMIT,
    )
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
        return HttpResponseBadRequest(
            f"Export refused: {filter_errors(form)}", content_type="text/plain; charset=utf-8"
        )
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
