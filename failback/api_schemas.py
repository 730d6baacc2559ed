"""Request and response shapes of the /api/v1/ automation API (they generate its OpenAPI schema).

Inputs are typed and bounded here, so malformed requests get a 422 before any service call; whether an
action is allowed is decided by the service layer (workflow.py, plans.py) alone.
"""

from datetime import date, datetime
from typing import Annotated, Any, Literal

from ninja import Schema
from pydantic import AwareDatetime, Field, StrictBool, StrictInt, StringConstraints

from .choices import AuditAction, CommitPolicy, GuestGate, Outcome, ReplicaState, SessionStatus, SwitchMode
from .forms import DATE_MAX, DATE_MIN, DB_INT_MAX
from .models import VCenterConnection
from .workflow import REASON_MAX


def Text(max_length, min_length=0):
    """A string without NUL characters (PostgreSQL cannot store them)."""
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length, pattern=r"^[^\x00]*$")]


Reason = Annotated[Text(REASON_MAX), Field(description="Reason or ticket, recorded in the audit trail")]
HookPoint = Literal["before_phase1", "before_switch", "after_switch", "after_commit", "after_undo"]  # hooks.POINTS
Id = Annotated[int, Field(ge=1, le=DB_INT_MAX)]  # in a query string, where every value arrives as text


# Bodies are JSON, so their numbers and booleans are typed: `true` is not 1, "5" is not 5, 1 is not true.
def Int(ge, le):
    return Annotated[StrictInt, Field(ge=ge, le=le)]


BodyId = Int(1, DB_INT_MAX)

BANDWIDTH_UNIT = (
    "Bandwidth limit of the disk copy in megabytes per second: 1 MB/s = 10^6 bytes/s (decimal, not MiB/s; "
    "3 MB/s is 2.86 MiB/s, the unit the portal's pages show rates in)."
)


class Error(Schema):
    detail: str = Field(description="What went wrong, in the words the portal shows people")


class ValidationProblem(Schema):
    detail: list[dict[str, Any]] = Field(description="One entry per invalid field (pydantic's format)")


# -- reads -----------------------------------------------------------------------------------------


class Page(Schema):
    count: int = Field(description="Rows matching the filters, all pages together")
    limit: int
    offset: int


class DiskOut(Schema):
    key: str
    capacity_bytes: int
    datastore: str


class ReplicaOut(Schema):
    id: int
    name: str
    source_name: str
    platform: str
    vm_id: str
    host: str
    site: str
    state: ReplicaState
    state_label: str
    power: str = Field(description="The VM's live power state at the platform, or why it is unknown")
    production_vm_id: str
    active_session_id: int | None
    can_start_failback: bool
    updated_at: datetime
    disks: list[DiskOut]


class ReplicaPage(Page):
    items: list[ReplicaOut]


class DatastoreOut(Schema):
    name: str
    free_bytes: int


class NicOut(Schema):
    key: str
    network: str | None = Field(description="The replica's network (null: disconnected)")
    suggested: str | None = Field(
        description="The production twin the start form pre-selects (dr-net -> prod-net), if any"
    )


class TargetsOut(Schema):
    hosts: list[str]
    datastores: list[DatastoreOut]
    networks: list[str]
    nics: list[NicOut]
    suggested_network_map: dict[str, str | None] = Field(
        description="Ready to pass as network_map when starting a failback"
    )
    resource_pools: dict[str, str] = Field(description="vSphere: id -> path (empty on the lab)")
    folders: dict[str, str] = Field(description="vSphere: id -> path (empty on the lab)")


class SessionDiskOut(Schema):
    key: str
    capacity_bytes: int
    phase: int
    method: str = Field(description="full | tracked | digest (empty before the step starts)")
    method_reason: str
    bytes_total: int
    bytes_done: int
    bytes_written: int
    percent: int
    rate_bps: float
    eta_s: float | None
    phase1_digest: str
    source_digest: str
    target_digest: str
    verified: bool


class OccurrenceOut(Schema):
    start: datetime
    end: datetime
    label: str


class WindowsOut(Schema):
    """Switch when it fits: the rules, the window open now or next, and why the switch still waits."""

    windows: list[dict]
    lines: list[str]
    budget_s: int | None
    open: OccurrenceOut | None
    next: OccurrenceOut | None
    predicted_s: float | None
    fits: bool
    why_not: str | None
    last_missed: dict | None
    none_left: bool


class ConvergenceOut(Schema):
    """Writes outpacing the copy: the delta will not shrink however often catch-ups run."""

    write_bps: int
    copy_bps: int
    copy_basis: str
    since: datetime
    changed_bytes: int
    disks: list[dict]
    text: str


class WaitingOut(Schema):
    id: int = Field(description="The approval request's id (POST /approvals/{id}/approve)")
    action: str = Field(description="switch, schedule_switch, commit, undo or cancel")
    requested_by: str | None = Field(description="Who asked; null when the portal's own moment waits")
    expires_at: datetime
    text: str = Field(description="What waits, in the words the page shows")


class SessionOut(Schema):
    id: int
    replica_id: int
    replica_name: str
    plan_id: int | None
    plan_order: int
    status: SessionStatus
    status_label: str
    allowed_actions: list[str] = Field(description="Actions the session's status allows now (the caller's role aside)")
    vm_name: str
    target_host: str
    target_datastore: str
    network_map: dict[str, str | None]
    resource_pool: str
    folder: str
    production_vm_id: str
    switch_mode: SwitchMode
    switch_at: datetime | None
    power_on_after: bool
    shutdown_timeout_s: int
    bandwidth_mbps: int | None = Field(description=BANDWIDTH_UNIT)
    commit_policy: CommitPolicy
    commit_after_min: int | None
    policy_due_at: datetime | None = Field(description="When the commit policy acts, unless stopped")
    policy_stopped_at: datetime | None
    started_by: str
    reason: str
    created_at: datetime
    phase1_started_at: datetime | None
    phase1_ended_at: datetime | None
    switch_started_at: datetime | None
    replica_off_at: datetime | None
    phase2_ended_at: datetime | None
    production_on_at: datetime | None
    ended_at: datetime | None
    switch_window_s: float | None = Field(description="Downtime users felt: replica going down to production on")
    predicted_window_s: float | None
    switch_windows: WindowsOut | None = Field(description="Maintenance windows and downtime budget, if any")
    convergence: ConvergenceOut | None = Field(description="Set while the VM's writes outpace the copy")
    waiting_for_approval: list[WaitingOut] = Field(
        description="Requests about this failback (or its plan's switch) waiting for a second person now"
    )
    stop_method: str
    error: str
    disks: list[SessionDiskOut]


class SessionPage(Page):
    items: list[SessionOut]


class PlanMemberOut(Schema):
    session_id: int
    plan_order: int
    replica_id: int
    replica_name: str
    status: SessionStatus
    status_label: str


class PlanOut(Schema):
    id: int
    name: str
    created_by: str
    created_at: datetime
    reason: str
    concurrency: int
    switch_mode: SwitchMode
    switch_at: datetime | None
    power_on_after: bool
    power_on_delay_s: int
    guest_gate: GuestGate
    guest_gate_address: str
    guest_gate_timeout_s: int
    hooks: dict[str, list[str]] = Field(description="Hooks every member runs, by point ({}: each replica's defaults)")
    switch_started_at: datetime | None
    switch_windows: WindowsOut | None = Field(description="Maintenance windows and downtime budget, if any")
    percent: int = Field(description="Bytes copied of all members' disks, in percent")
    waiting_for_approval: list[WaitingOut] = Field(
        description="The plan's own switch or schedule, waiting for a second person now"
    )
    members: list[PlanMemberOut]


class PlanPage(Page):
    items: list[PlanOut]


class AuditEventOut(Schema):
    id: int
    at: datetime
    actor: str
    action: str
    outcome: Outcome
    from_state: str
    to_state: str
    replica: str
    session: int | None
    detail: str
    data: dict[str, Any]


class AuditPage(Page):
    items: list[AuditEventOut]


class AuditFilters(Schema):
    """The audit page's filters (failback.audit_filters.AuditFilterForm)."""

    q: Text(200) = ""
    user: Text(150) = ""
    replica: Text(200) = ""
    session: Id | None = None
    action: AuditAction | None = None
    outcome: Outcome | None = None
    since: Annotated[date, Field(ge=DATE_MIN, le=DATE_MAX)] | None = None
    until: Annotated[date, Field(ge=DATE_MIN, le=DATE_MAX, description="Inclusive")] | None = None


# -- actions ---------------------------------------------------------------------------------------


class StartFailbackIn(Schema):
    vm_name: Text(80, 1) = Field(description="Name of the production VM to build")
    target_host: Text(200, 1)
    target_datastore: Text(200, 1)
    network_map: dict[Text(200, 1), Text(200, 1) | None] = Field(
        default_factory=dict, description="Every replica network -> a target network, or null for disconnected"
    )
    resource_pool: Text(200) = ""
    folder: Text(200) = ""
    switch_mode: SwitchMode = SwitchMode.MANUAL
    switch_at: AwareDatetime | None = Field(
        None, description="With a time zone offset; required when switch_mode is scheduled"
    )
    power_on_after: StrictBool = True
    bandwidth_mbps: Int(1, 100_000) | None = Field(None, description=BANDWIDTH_UNIT + " None: no limit.")
    commit_policy: CommitPolicy = CommitPolicy.NONE
    commit_after_min: Int(1, DB_INT_MAX) | None = None
    override_checks: StrictBool = Field(
        False, description="Start despite a failed pre-failback check (needs the permission; give a reason)"
    )
    reason: Reason = ""
    hooks: dict[HookPoint, list[Text(100, 1)]] | None = Field(
        None,
        description="Hooks to run at each point, by name from the allow-list file (FAILBACK_HOOKS_FILE). "
        "None: the file's defaults for this replica; {}: none.",
    )


class PlanMemberIn(Schema):
    replica_id: BodyId
    vm_name: Text(80, 1)
    target_host: Text(200, 1)
    target_datastore: Text(200, 1)
    network_map: dict[Text(200, 1), Text(200, 1) | None] = Field(default_factory=dict)


class StartPlanIn(Schema):
    name: Text(100, 1)
    members: list[PlanMemberIn] = Field(min_length=1, max_length=500, description="In boot order")
    concurrency: Int(1, 20) = 2
    switch_mode: SwitchMode = SwitchMode.MANUAL
    switch_at: AwareDatetime | None = None
    power_on_after: StrictBool = True
    power_on_delay_s: Int(0, 3600) = 0
    guest_gate: GuestGate = Field(
        GuestGate.NONE,
        description="What each member waits for after its power-on before the next member's: 'guest' (VMware "
        "Tools heartbeat; the lab's guest state), 'tcp' (guest_gate_address accepts a connection) or '' (none). "
        "Not met within guest_gate_timeout_s: the members not yet switched fail their switch, replicas running",
    )
    guest_gate_address: Text(200) = Field("", description="host:port for the tcp gate; {vm} is the member's VM name")
    guest_gate_timeout_s: Int(1, 3600) = 300
    hooks: dict[HookPoint, list[Text(100, 1)]] | None = Field(
        None,
        description="Hooks from the allow-list (FAILBACK_HOOKS_FILE) every member runs at each point. "
        "None: each replica's defaults from the file.",
    )
    reason: Reason = ""


class ReasonIn(Schema):
    reason: Reason = ""


class SwitchIn(ReasonIn):
    override_checks: StrictBool = Field(
        False, description="Switch despite a failed pre-switch check (needs the permission; give a reason)"
    )


class ScheduleIn(ReasonIn):
    switch_at: AwareDatetime = Field(description="With a time zone offset, more than 5 s and less than a year ahead")


class WindowIn(Schema):
    kind: Literal["once", "weekly"] = Field(description="once: a date-time span; weekly: days and a time of day span")
    start: Annotated[str, StringConstraints(max_length=40)] = Field(
        description="once: YYYY-MM-DDTHH:MM; weekly: HH:MM (the zone's wall-clock time, no offset)"
    )
    end: Annotated[str, StringConstraints(max_length=40)] = Field(
        description="After start (weekly: 00:00 means midnight at the end of the day)"
    )
    tz: Annotated[str, StringConstraints(max_length=60)] = Field(description="An IANA time zone: Europe/Paris, UTC")
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=list, max_length=7, description="weekly: the days it opens"
    )


class WindowsIn(ReasonIn):
    windows: list[WindowIn] = Field(
        max_length=20, description="Maintenance windows; none means any time (with a budget) or a manual switch"
    )
    downtime_budget_s: int | None = Field(
        None, ge=1, le=604800, description="The longest predicted downtime the switch may start with, in seconds"
    )


class CancelIn(ReasonIn):
    keep_production_vm: StrictBool = Field(
        False, description="Keep the half-built production VM so that a later failback sends only what differs"
    )


# -- vCenter connections (Administrator) ----------------------------------------------------------

Thumbprint = Annotated[
    str,
    StringConstraints(pattern=r"^([0-9A-Fa-f]{2}[:-]){31}[0-9A-Fa-f]{2}$"),
    Field(description="SHA-256 of the server's certificate: 32 hexadecimal bytes separated by colons"),
]
ThumbprintOrNone = Annotated[
    str,
    StringConstraints(pattern=r"^(([0-9A-Fa-f]{2}[:-]){31}[0-9A-Fa-f]{2})?$"),
    Field(description="SHA-256 of the server's certificate (32 hexadecimal bytes separated by colons), or empty"),
]
Host = Annotated[
    str,
    StringConstraints(min_length=1, max_length=253, pattern=r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])$"),
    Field(description="The vCenter's DNS name or IP address ([…] for IPv6)"),
]
DatastoreName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^=\r\n\x00]+$")]
MountPath = Annotated[str, StringConstraints(min_length=2, max_length=1000, pattern=r"^/[^\r\n\x00]*$")]


class ConnectionFields(Schema):
    """Everything of a connection but its password: what is sent back, and what may be changed."""

    name: Text(100, 1)
    host: Host
    port: Int(1, 65535) = 443
    username: Text(200, 1)
    tls_mode: VCenterConnection.TLS = Field(
        VCenterConnection.TLS.CA, description="ca: verify against the system CA store; thumbprint: pin it"
    )
    thumbprint: ThumbprintOrNone = Field("", description="Required when tls_mode is thumbprint")
    transport: VCenterConnection.Transport = VCenterConnection.Transport.DIRECT
    datastore_paths: dict[DatastoreName, MountPath] = Field(
        default_factory=dict, description="Direct transport: datastore name -> its local mount path on the worker host"
    )
    replica_suffix: Text(50) = Field("_replica", description="VMs named <source><suffix> are discovered as replicas")
    replica_attribute: Text(100) = Field("", description="Optional custom attribute whose value names the source")
    sync_minutes: Int(1, 10_080) = Field(15, description="Minutes between scheduled inventory syncs")


class ConnectionIn(ConnectionFields):
    password: Text(500, 1) = Field(description="Stored encrypted; never returned")


class ConnectionPatch(Schema):
    """Only the fields sent change; a password sent replaces the stored one."""

    name: Text(100, 1) | None = None
    host: Host | None = None
    port: Int(1, 65535) | None = None
    username: Text(200, 1) | None = None
    password: Text(500, 1) | None = Field(None, description="Stored encrypted; never returned")
    tls_mode: VCenterConnection.TLS | None = None
    thumbprint: ThumbprintOrNone | None = None
    transport: VCenterConnection.Transport | None = None
    datastore_paths: dict[DatastoreName, MountPath] | None = None
    replica_suffix: Text(50) | None = None
    replica_attribute: Text(100) | None = None
    sync_minutes: Int(1, 10_080) | None = None


class ConnectionOut(Schema):
    id: int
    name: str
    host: str
    port: int
    username: str
    tls_mode: VCenterConnection.TLS
    thumbprint: str
    transport: VCenterConnection.Transport
    datastore_paths: dict[str, str]
    replica_suffix: str
    replica_attribute: str
    sync_minutes: int
    sync_scheduled: bool = Field(
        description="The periodic sync runs (false while the login is unverified or was refused)"
    )
    last_test_at: datetime | None
    last_test_result: str = Field(
        description="The last Test connection: 'Connected: <vCenter version>' or 'Failed: <why>'"
    )
    synced_at: datetime | None
    sync_error: str = Field(
        description="Why the last sync failed, or why the connection has no scheduled sync (not verified when saved)"
    )
    inventory: dict[str, int] = Field(description="What the last sync found: vms, hosts, datastores, networks")
    replica_ids: list[int]
    created_at: datetime


class ConnectionPage(Page):
    items: list[ConnectionOut]


class ThumbprintOut(Schema):
    host: str
    port: int
    thumbprint: str = Field(description="What the server presents now: compare it with vCenter's before pinning it")
    pinned: bool = Field(description="It is the thumbprint this connection pins")


class PinIn(Schema):
    thumbprint: Thumbprint


class ConnectionTestOut(Schema):
    ok: bool
    result: str = Field(description="'Connected: <vCenter version>' or 'Failed: <the exact error>'")


class PairIn(Schema):
    vm_id: Text(100, 1) = Field(description="The VM's managed object id in vCenter (vm-42)")
    source_name: Text(200, 1) = Field(description="The workload it is the replica of")


class HookOut(Schema):
    name: str = Field(description="What a failback's or plan's hooks field names, at a point")
    timeout_s: int
    on_error: Literal["fail", "continue"] = Field(description="fail: the step fails (before phase 1 or the switch)")
    default_points: list[str] = Field(description="Where it runs by default, for the replicas below")
    replicas: list[str] = Field(description="Glob patterns of the replicas that get it by default")


class HooksOut(Schema):
    points: dict[str, str] = Field(description="The points a hook can run at, and when each is")
    hooks: list[HookOut] = Field(description="The Administrator's allow-list (FAILBACK_HOOKS_FILE); commands not shown")
