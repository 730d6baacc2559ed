"""Views: permission check, form, one call into the workflow, one template. No rules here."""

from contextlib import closing

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Prefetch
from django.http import Http404, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from . import workflow
from .choices import ACTIVE
from .forms import ReasonForm, ScheduleSwitchForm, StartFailbackForm
from .hypervisors.registry import hypervisor_for
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


@require_GET
def replica_list(request):
    replicas = list(Replica.objects.select_related("connection")
                    .prefetch_related(Prefetch("sessions", queryset=FailbackSession.objects.filter(status__in=ACTIVE)), "disks"))
    return render(request, "failback/replica_list.html", {"replicas": _attach_power_states(replicas), "can_operate": _can_operate(request.user)})


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
    page = Paginator(sessions, 50).get_page(request.GET.get("page"))
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


@require_GET
def audit_list(request):
    events = AuditEvent.objects.select_related("session", "replica").order_by("-at", "-id")
    if request.GET.get("session"):
        events = events.filter(session_id=request.GET["session"]) if request.GET["session"].isdigit() else events.none()
    page = Paginator(events, 100).get_page(request.GET.get("page"))
    return render(request, "failback/audit_list.html", {"page": page})
