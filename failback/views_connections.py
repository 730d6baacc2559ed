"""vCenter connection pages (Administrator): register, test, pin the thumbprint, sync, pair replicas."""

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.http import HttpResponseForbidden
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import connections, workflow
from .forms import ConnectionForm, PairReplicaForm
from .models import VCenterConnection
from .workflow import Refused

view_perm = permission_required("failback.view_vcenterconnection", raise_exception=True)


@require_GET
@view_perm
def connection_list(request):
    return render(request, "failback/connection_list.html", {"connections": VCenterConnection.objects.all()})


@require_http_methods(["GET", "POST"])
@view_perm
def connection_edit(request, pk=None):
    instance = get_object_or_404(VCenterConnection, pk=pk) if pk else VCenterConnection()
    form = ConnectionForm(request.POST or None, instance=instance)
    error = None
    if request.method == "POST" and form.is_valid():
        try:
            connection = connections.save_connection(request.user, form.save(), password=form.cleaned_data["password"])
        except Refused as refused:
            error = refused.message
        else:
            if connection.sync_error:  # saved, but the login could not be checked: say why
                messages.warning(request, f"Connection {connection.name} saved. {connection.sync_error}")
            else:
                messages.success(request, f"Connection {connection.name} saved; its login works.")
            return redirect("failback:connection", pk=connection.pk)
    return render(
        request,
        "failback/connection_form.html",
        {"form": form, "connection": instance if pk else None, "error": error},
        status=400 if request.method == "POST" else 200,
    )


@require_GET
@view_perm
def connection_detail(request, pk):
    connection = get_object_or_404(VCenterConnection, pk=pk)
    vms = connection.inventory.get("vms", []) if connection.inventory else []
    return render(
        request,
        "failback/connection_detail.html",
        {
            "connection": connection,
            "vms": vms,
            "pair_form": PairReplicaForm(),
            "replicas": connection.replicas.all(),
            "sync_scheduled": connections.sync_scheduled(connection),
        },
    )


@require_POST
def connection_action(request, pk, action):
    """No view-level permission here: each service function checks the Administrator role itself, so
    a forged request is refused *and audited*."""
    connection = get_object_or_404(VCenterConnection, pk=pk)
    try:
        if action == "test":
            ok, result = connections.test_connection(request.user, pk)
            (messages.success if ok else messages.error)(request, result)
        elif action == "thumbprint":
            thumbprint = connections.fetch_thumbprint(request.user, connection)
            messages.info(
                request,
                f"{connection.host}:{connection.port} presents the SHA-256 thumbprint {thumbprint}. "
                "Compare it with the one vCenter shows, then pin it.",
            )
        elif action == "pin":
            connection = connections.pin_thumbprint(request.user, pk, request.POST.get("thumbprint", ""))
            messages.success(request, f"Thumbprint {connection.thumbprint} pinned; the login through it works.")
        elif action == "sync":
            connections.request_sync(request.user, pk)
            messages.info(request, "Inventory sync queued; reload this page to see its result.")
        elif action == "pair":
            form = PairReplicaForm(request.POST)
            if not form.is_valid():
                messages.error(request, "Pick a VM and name its source workload.")
            else:
                replica = connections.pair_replica(
                    request.user, pk, form.cleaned_data["vm_id"], form.cleaned_data["source_name"]
                )
                messages.success(request, f"{replica.name} paired with {replica.source_name}.")
        else:
            messages.error(request, "Unknown action.")
    except Refused as refused:
        if not request.user.has_perm("failback.view_vcenterconnection"):  # the connection page would be closed to them
            return HttpResponseForbidden(refused.message)
        messages.error(request, refused.message)
    return redirect("failback:connection", pk=pk)


@require_POST
def declare_failover(request, pk):
    try:
        replica = workflow.declare_failover(request.user, pk, reason=request.POST.get("reason", ""))
        messages.success(request, f"{replica.name} is now in Failover.")
    except Refused as refused:
        messages.error(request, refused.message)
    return redirect("failback:replicas")
