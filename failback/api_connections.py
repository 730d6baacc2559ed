"""/api/v1/ for vCenter set-up: connections (Administrator) and declaring a replica's failover (Operator).

Each endpoint calls the same service function as the connection pages (failback.connections) or the
replica page (workflow.declare_failover), so the role checks, the refusals and the audit rows are the
pages'. A connection's fields are validated by the pages' own form (ConnectionForm), so the API and the
page accept and refuse the same input; its errors come back as 422 naming the field. The password is
write-only: it is stored encrypted and never returned.

Registered on failback.api's ``api`` (imported at the end of that module).
"""

from ninja import Status
from ninja.errors import HttpError, ValidationError

from . import api_render as render
from . import connections, workflow
from .api import ACT, ONE, READ, Limit, Offset, PathId, _audited, _one, _page, api
from .api_schemas import (
    ConnectionIn,
    ConnectionOut,
    ConnectionPage,
    ConnectionPatch,
    ConnectionTestOut,
    Error,
    PairIn,
    PinIn,
    ReasonIn,
    ReplicaOut,
    ThumbprintOut,
)
from .forms import ConnectionForm
from .models import Replica, VCenterConnection

FORM_FIELDS = ConnectionForm.Meta.fields
TAGS = ["connections"]
SLOW = {**ACT, 502: Error}  # these talk to the vCenter


def _connection_out(connection):
    inventory = connection.inventory or {}
    return {
        **{f: getattr(connection, f) for f in ("id", *connections.PUBLIC_FIELDS, "created_at")},
        "datastore_paths": connection.datastore_paths or {},
        "sync_scheduled": connections.sync_scheduled(connection),
        "last_test_at": connection.last_test_at,
        "last_test_result": connection.last_test_result,
        "synced_at": connection.synced_at,
        "sync_error": connection.sync_error,
        "inventory": {k: len(inventory.get(k) or ()) for k in ("vms", "hosts", "datastores", "networks")},
        "replica_ids": list(connection.replicas.order_by("pk").values_list("pk", flat=True)),
    }


def _fresh(pk):
    return _connection_out(VCenterConnection.objects.get(pk=pk))


def _readable(request):
    if not connections.may_view(request.auth):
        raise HttpError(
            403, f"{request.auth.get_username()} may not see vCenter connections: the Administrator role is needed."
        )


def _validated(request, action, instance, fields):
    """The connection page's form over the stored values and the fields sent: the same rules, the same
    messages. The role is checked first, so a Viewer learns nothing from the validation."""
    connections.require_admin(request.auth, action, instance if instance.pk else None)
    data = {f: getattr(instance, f) for f in FORM_FIELDS if getattr(instance, f) is not None}
    data["datastore_paths_text"] = "\n".join(f"{k} = {v}" for k, v in (instance.datastore_paths or {}).items())
    for name, value in fields.items():
        if name == "datastore_paths":
            data["datastore_paths_text"] = "\n".join(f"{k} = {v}" for k, v in value.items())
        else:
            data[name] = value
    form = ConnectionForm(data, instance=instance)
    if not form.is_valid():
        raise ValidationError(
            [
                {
                    "loc": ["body", "datastore_paths" if field == "datastore_paths_text" else field],
                    "msg": " ".join(messages),
                    "type": "value_error",
                }
                for field, messages in form.errors.items()
            ]
        )
    return form.save(), form.cleaned_data["password"]


@api.get(
    "/connections",
    response={200: ConnectionPage, **READ, 403: Error},
    tags=TAGS,
    summary="List vCenter connections (Administrator)",
)
def list_connections(request, limit: int = Limit, offset: int = Offset):
    _readable(request)
    rows = VCenterConnection.objects.order_by("name")
    return _page(rows, limit, offset, lambda items: [_connection_out(c) for c in items])


@api.get(
    "/connections/{connection_id}",
    response={200: ConnectionOut, **ONE, 403: Error},
    tags=TAGS,
    summary="One vCenter connection (never its password)",
)
def get_connection(request, connection_id: PathId):
    _readable(request)
    return _connection_out(_one(VCenterConnection.objects, connection_id, "vCenter connection"))


@api.post(
    "/connections",
    response={201: ConnectionOut, **SLOW},
    tags=TAGS,
    **_audited("create_connection"),
    summary="Register a vCenter: the save logs in, and a wrong password or pinned thumbprint is refused (409)",
)
def create_connection(request, body: ConnectionIn):
    connection, password = _validated(request, "create_connection", VCenterConnection(), body.dict())
    connection = connections.save_connection(request.auth, connection, password=password)
    return Status(201, _fresh(connection.pk))


@api.patch(
    "/connections/{connection_id}",
    response={200: ConnectionOut, **SLOW},
    tags=TAGS,
    **_audited("update_connection"),
    summary="Change a vCenter connection (only the fields sent); the save logs in again",
)
def update_connection(request, connection_id: PathId, body: ConnectionPatch):
    instance = _one(VCenterConnection.objects, connection_id, "vCenter connection")
    fields = {k: v for k, v in body.dict().items() if v is not None}
    connection, password = _validated(request, "update_connection", instance, fields)
    connections.save_connection(request.auth, connection, password=password)
    return _fresh(connection_id)


@api.post(
    "/connections/{connection_id}/thumbprint",
    response={200: ThumbprintOut, **SLOW},
    tags=TAGS,
    **_audited("fetch_thumbprint"),
    summary="The SHA-256 thumbprint the server presents now, to compare with vCenter's before pinning it",
)
def fetch_thumbprint(request, connection_id: PathId):
    connection = _one(VCenterConnection.objects, connection_id, "vCenter connection")
    thumbprint = connections.fetch_thumbprint(request.auth, connection)
    pinned = connection.tls_mode == VCenterConnection.TLS.THUMBPRINT and connection.thumbprint == thumbprint
    return {"host": connection.host, "port": connection.port, "thumbprint": thumbprint, "pinned": pinned}


@api.post(
    "/connections/{connection_id}/pin",
    response={200: ConnectionOut, **SLOW},
    tags=TAGS,
    **_audited("update_connection"),
    summary="Pin a thumbprint (TLS mode becomes thumbprint); refused when the server presents another one",
)
def pin_thumbprint(request, connection_id: PathId, body: PinIn):
    _one(VCenterConnection.objects, connection_id, "vCenter connection")
    connections.pin_thumbprint(request.auth, connection_id, body.thumbprint)
    return _fresh(connection_id)


@api.post(
    "/connections/{connection_id}/test",
    response={200: ConnectionTestOut, **SLOW},
    tags=TAGS,
    **_audited("test_connection"),
    summary="Log in and report the vCenter version, or the exact error (ok: false)",
)
def test_connection(request, connection_id: PathId):
    _one(VCenterConnection.objects, connection_id, "vCenter connection")
    ok, result = connections.test_connection(request.auth, connection_id)
    return {"ok": ok, "result": result}


@api.post(
    "/connections/{connection_id}/sync",
    response={202: ConnectionOut, **ACT},
    tags=TAGS,
    **_audited("sync_inventory"),
    summary="Queue an inventory sync (replica discovery); its result shows in synced_at or sync_error",
)
def sync_inventory(request, connection_id: PathId):
    _one(VCenterConnection.objects, connection_id, "vCenter connection")
    connections.request_sync(request.auth, connection_id)
    return Status(202, _fresh(connection_id))


@api.post(
    "/connections/{connection_id}/pair",
    response={201: ReplicaOut, **SLOW},
    tags=TAGS,
    **_audited("pair_replica"),
    summary="Pair a VM by hand as the replica of a source workload (any naming)",
)
def pair_replica(request, connection_id: PathId, body: PairIn):
    _one(VCenterConnection.objects, connection_id, "vCenter connection")
    replica = connections.pair_replica(request.auth, connection_id, body.vm_id, body.source_name)
    return Status(201, render.replicas([Replica.objects.get(pk=replica.pk)])[0])


@api.post(
    "/replicas/{replica_id}/declare-failover",
    response={200: ReplicaOut, **SLOW},
    tags=["actions"],
    **_audited("declare_failover"),
    summary="Declare that a Ready replica now runs the workload (Failover); it must be powered on (Operator)",
)
def declare_failover(request, replica_id: PathId, body: ReasonIn):
    _one(Replica.objects, replica_id, "replica")
    workflow.declare_failover(request.auth, replica_id, reason=body.reason)
    return render.replicas([Replica.objects.get(pk=replica_id)])[0]
