from django.conf import settings
from django.db import models, transaction
from django.db.models import F
from django.db.models.functions import Upper
from django.utils import timezone

from .choices import (
    ACTIVE,
    GUARDS,
    REPLICA_COLOURS,
    STATUS_COLOURS,
    Approvable,
    AuditAction,
    CommitPolicy,
    GuestGate,
    Outcome,
    ReplicaState,
    SessionStatus,
    SwitchMode,
)
from .hypervisors.registry import Platform


class VCenterConnection(models.Model):
    """A vCenter the portal talks to. The password is stored encrypted and never rendered back."""

    class TLS(models.TextChoices):
        CA = "ca", "Verify against the system CA store"
        THUMBPRINT = "thumbprint", "Pin the server's SHA-256 thumbprint"

    class Transport(models.TextChoices):
        DIRECT = "direct", "Direct (datastores mounted on the worker host)"
        NETWORK = "network", "Network (datastore HTTP file interface)"
        NBD = "nbd", "NBD (nbdkit per disk: VDDK, or a mounted datastore)"

    name = models.CharField(max_length=100, unique=True)
    host = models.CharField(max_length=253)
    port = models.PositiveIntegerField(default=443)
    username = models.CharField(max_length=200)
    password_encrypted = models.TextField(editable=False)
    tls_mode = models.CharField(max_length=20, choices=TLS.choices, default=TLS.CA)
    thumbprint = models.CharField(max_length=200, blank=True)  # SHA-256, AA:BB:... form
    transport = models.CharField(max_length=20, choices=Transport.choices, default=Transport.DIRECT)
    datastore_paths = models.JSONField(default=dict, blank=True)  # datastore name -> local mount path
    replica_suffix = models.CharField(max_length=50, default="_replica", blank=True)
    replica_attribute = models.CharField(max_length=100, blank=True)  # custom attribute holding the source name
    sync_minutes = models.PositiveIntegerField(default=15)
    inventory = models.JSONField(default=dict, blank=True, editable=False)  # last synced snapshot
    synced_at = models.DateTimeField(null=True, blank=True, editable=False)
    sync_error = models.TextField(blank=True, editable=False)
    last_test_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_test_result = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def __repr__(self):  # never the password, not even encrypted
        return f"<VCenterConnection {self.name} {self.username}@{self.host}:{self.port}>"

    def set_password(self, raw):
        from .credentials import encrypt

        self.password_encrypted = encrypt(raw)

    def reveal_password(self):
        from .credentials import decrypt

        return decrypt(self.password_encrypted)


class Replica(models.Model):
    """A replica VM at the DR site and the source workload it protects."""

    name = models.CharField(max_length=200, unique=True)  # the replica VM's name
    source_name = models.CharField(max_length=200)  # the workload it protects
    platform = models.CharField(
        max_length=20, choices=Platform.choices, default=Platform.LAB
    )  # which hypervisor holds it
    connection = models.ForeignKey(
        VCenterConnection, null=True, blank=True, on_delete=models.PROTECT, related_name="replicas"
    )
    vm_id = models.CharField(max_length=100)  # the replica VM's id at the platform
    host = models.CharField(max_length=200)
    site = models.CharField(max_length=100, default="DR")
    state = models.CharField(max_length=20, choices=ReplicaState.choices, default=ReplicaState.FAILOVER)
    production_vm_id = models.CharField(max_length=100, blank=True)  # set by commit
    # Measured on this VM's last switch; the prediction of the next switch window uses them.
    measured_shutdown_s = models.FloatField(null=True, blank=True)
    measured_power_on_s = models.FloatField(null=True, blank=True)
    measured_delta_bps = models.FloatField(null=True, blank=True)  # final delta + verification, bytes/s
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [
            ("operate_failback", "Can start, switch, schedule, commit and undo failbacks"),
            ("override_checks", "Can start or switch despite a failed pre-failback check (with a reason)"),
        ]

    def __str__(self):
        return self.name

    @property
    def colour(self):
        return REPLICA_COLOURS[self.state]

    @property
    def can_start_failback(self):
        return self.state == ReplicaState.FAILOVER and self.active_session is None

    @property
    def active_session(self):
        # Prefetch-friendly: uses the cache when sessions were prefetched.
        return next((s for s in self.sessions.all() if s.status in ACTIVE), None)

    def set_disks(self, disks):
        """Record the disks as the platform reports them (``DiskSpec``s: grown, added or moved since they
        were last recorded); returns whether anything changed."""
        live = {(d.key, d.capacity_bytes, d.datastore) for d in disks}
        if live == {(d.key, d.capacity_bytes, d.datastore) for d in self.disks.all()}:
            return False
        with transaction.atomic():
            self.disks.all().delete()
            ReplicaDisk.objects.bulk_create(
                ReplicaDisk(replica=self, key=k, capacity_bytes=c, datastore=ds) for k, c, ds in sorted(live)
            )
        return True


class ReplicaDisk(models.Model):
    replica = models.ForeignKey(Replica, on_delete=models.CASCADE, related_name="disks")
    key = models.CharField(max_length=50)
    capacity_bytes = models.BigIntegerField()
    datastore = models.CharField(max_length=200)

    class Meta:
        ordering = ["key"]
        constraints = [models.UniqueConstraint(fields=["replica", "key"], name="unique_disk_key_per_replica")]


class FailbackPlan(models.Model):
    """A named, ordered group of replicas failed back together: phase 1 with a concurrency limit,
    one switch moment for all, production VMs powered on in order with a delay between them."""

    name = models.CharField(max_length=100, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    reason = models.CharField(max_length=500, blank=True)
    concurrency = models.PositiveSmallIntegerField(default=2)  # phase 1 copies running at once
    switch_mode = models.CharField(max_length=20, choices=SwitchMode.choices, default=SwitchMode.MANUAL)
    switch_at = models.DateTimeField(null=True, blank=True)
    power_on_after = models.BooleanField(default=True)
    power_on_delay_s = models.PositiveIntegerField(default=0)  # between one production VM's power-on and the next
    switch_started_at = models.DateTimeField(null=True, blank=True)  # set once: the plan switches once
    # Switch when it fits (windows.py): maintenance windows, a downtime budget, what was decided about them.
    switch_windows = models.JSONField(default=list, blank=True)
    downtime_budget_s = models.PositiveIntegerField(null=True, blank=True)
    window_state = models.JSONField(default=dict, blank=True)
    # Guest-ready gate (guest_gate.py): after a member's power-on, before the next member's.
    guest_gate = models.CharField(max_length=10, choices=GuestGate.choices, default=GuestGate.NONE, blank=True)
    guest_gate_address = models.CharField(max_length=200, blank=True)  # "host:port", {vm}: the member's VM name
    guest_gate_timeout_s = models.PositiveIntegerField(default=300)
    hooks = models.JSONField(default=dict, blank=True)  # {point: [hook names]}, given to every member

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return self.name

    def members(self):
        return self.sessions.select_related("replica").prefetch_related("disks").order_by("plan_order", "pk")

    @staticmethod
    def summary(members):
        """Counts per status and the bytes progress of the plan as a whole."""
        counts = {}
        done = total = 0
        for s in members:
            counts[s.get_status_display()] = counts.get(s.get_status_display(), 0) + 1
            for d in s.disks.all():
                done += d.bytes_done
                total += d.bytes_total
        return {"counts": counts, "percent": round(100 * done / total) if total else 0, "done": done, "total": total}


class FailbackSession(models.Model):
    """One attempt to move a replica's workload back to production; keeps every step for audit."""

    replica = models.ForeignKey(Replica, on_delete=models.PROTECT, related_name="sessions")
    status = models.CharField(max_length=20, choices=SessionStatus.choices, default=SessionStatus.QUEUED)
    # where the production VM goes
    vm_name = models.CharField(max_length=200)
    target_host = models.CharField(max_length=200)
    target_datastore = models.CharField(max_length=200)
    network_map = models.JSONField(default=dict, blank=True)
    resource_pool = models.CharField(max_length=200, blank=True)  # platform id; blank = the host's default
    folder = models.CharField(max_length=200, blank=True)  # platform id; blank = the datacenter's VM folder
    production_vm_id = models.CharField(max_length=100, blank=True)
    # Ownership: the name is reserved per platform and folder while the session is active (constraint
    # below), and the VM carries ``owner_tag`` from its creation, so clean-up touches only a VM this
    # session can prove it created (never one found by name alone).
    name_scope = models.CharField(max_length=250, blank=True)  # "platform:connection:folder"
    owner_tag = models.CharField(max_length=64, blank=True)
    # Fencing: each run of a step takes the lease (lease + 1). A run whose token is no longer the
    # session's stops without writing (a worker paused past the stall limit, then resumed).
    lease = models.PositiveBigIntegerField(default=0)
    # the switch moment
    switch_mode = models.CharField(max_length=20, choices=SwitchMode.choices, default=SwitchMode.MANUAL)
    switch_at = models.DateTimeField(null=True, blank=True)
    power_on_after = models.BooleanField(default=True)
    shutdown_timeout_s = models.PositiveIntegerField()
    bandwidth_mbps = models.PositiveIntegerField(null=True, blank=True)  # per-session transfer limit, MB/s
    # who and when
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    phase1_started_at = models.DateTimeField(null=True, blank=True)
    phase1_ended_at = models.DateTimeField(null=True, blank=True)
    switch_started_at = models.DateTimeField(null=True, blank=True)
    replica_stop_started_at = models.DateTimeField(null=True, blank=True)  # users lose the service from here
    replica_off_at = models.DateTimeField(null=True, blank=True)
    phase2_ended_at = models.DateTimeField(null=True, blank=True)
    production_on_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    stop_method = models.CharField(max_length=200, blank=True)  # how the replica was stopped, and why
    error = models.TextField(blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)  # last sign of life from the worker
    plan = models.ForeignKey(FailbackPlan, null=True, blank=True, on_delete=models.PROTECT, related_name="sessions")
    plan_order = models.PositiveSmallIntegerField(default=0)  # boot priority within the plan
    enqueued_at = models.DateTimeField(
        null=True, blank=True
    )  # phase 1 handed to a worker (plans queue within their limit)
    throughput = models.JSONField(default=list, blank=True)  # [[unix seconds, bytes/s, phase], ...] for the chart
    # Commit policy: what happens after N minutes in Failback unless an operator acts (or stops the countdown).
    commit_policy = models.CharField(max_length=20, choices=CommitPolicy.choices, default=CommitPolicy.NONE)
    commit_after_min = models.PositiveIntegerField(null=True, blank=True)
    policy_due_at = models.DateTimeField(null=True, blank=True)  # set when Failback is reached
    policy_stopped_at = models.DateTimeField(null=True, blank=True)
    # Cancel: keep the half-built production VM for a later retry (which then sends only what differs).
    keep_production_vm = models.BooleanField(default=False)
    reused_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Predicted switch window while Ready to switch: seconds, and its parts (see prediction.py).
    predicted_window_s = models.FloatField(null=True, blank=True)
    prediction = models.JSONField(default=dict, blank=True)
    catchup_at = models.DateTimeField(null=True, blank=True)  # last background catch-up sync
    # Hooks to run at each point ({"before_switch": ["drain-web"], ...}), names from the allow-list (hooks.py).
    hooks = models.JSONField(default=dict, blank=True)
    # Switch when it fits (windows.py): maintenance windows, a downtime budget, what was decided about them.
    switch_windows = models.JSONField(default=list, blank=True)
    downtime_budget_s = models.PositiveIntegerField(null=True, blank=True)
    window_state = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(
                fields=["-created_at", "-id"], name="session_newest_first"
            ),  # the sessions list, deep pages too
            models.Index(fields=["status"], name="session_status"),  # the dashboard's sections
            models.Index(fields=["ended_at"], name="session_ended"),  # /metrics: what ended lately, recent failures
        ]
        constraints = [
            # A second failback on the same replica is impossible, whatever races the application loses.
            models.UniqueConstraint(
                fields=["replica"],
                condition=models.Q(status__in=sorted(s.value for s in ACTIVE)),
                name="one_active_session_per_replica",
            ),
            # Two active failbacks never build VMs of the same name in the same place.
            models.UniqueConstraint(
                fields=["name_scope", "vm_name"],
                condition=models.Q(status__in=sorted(s.value for s in ACTIVE)),
                name="one_active_session_per_vm_name",
            ),
        ]

    def __str__(self):
        return f"Failback #{self.pk} of {self.replica_id}"

    @property
    def colour(self):
        return STATUS_COLOURS[self.status]

    @property
    def is_active(self):
        return self.status in ACTIVE

    def may(self, action):
        """Whether ``action`` (a ``choices.GUARDS`` key) is possible on this session now: the one guard the
        pages, the API's ``allowed_actions`` and the workflow all ask."""
        return GUARDS[action].allows(self)

    @property
    def allowed_actions(self):
        return [action for action in GUARDS if self.may(action)]

    @property
    def policy_counting(self):
        """The commit policy's countdown runs: Failback reached, not stopped, nobody acted yet."""
        return self.may("stop_commit_policy")

    @property
    def policy_verb(self):
        return {CommitPolicy.AUTO_COMMIT: "commit", CommitPolicy.AUTO_UNDO: "undo"}.get(self.commit_policy, "")

    def time_left_s(self, disks):
        """The running phase's time left: bytes still to move on every disk at the current rate."""
        if self.status not in (SessionStatus.PHASE1, SessionStatus.SWITCHING):
            return None
        remaining = sum(
            max(0, d.bytes_total - d.bytes_done)
            for d in disks
            if d.phase == (1 if self.status == SessionStatus.PHASE1 else 2)
        )
        rate = max((d.rate_bps for d in disks if d.rate_bps), default=0)
        if not remaining:
            return 0.0 if rate else None
        return remaining / rate if rate else None

    @property
    def forecast(self):
        """The latest predicted switch window (prediction.py) and the last switch checks, for display."""
        from django.utils.dateparse import parse_datetime

        data = self.prediction or {}
        return {
            "now": data.get("now"),
            "now_at": parse_datetime((data.get("now") or {}).get("at") or ""),
            "checks": data.get("checks") or [],
            "checked_at": data.get("checked_at"),
            "at_switch": data.get("at_switch"),
            "start_checks": data.get("start_checks") or [],
        }

    @property
    def switch_window(self):
        """Downtime users felt: replica going down -> production on (or phase 2 end without power on)."""
        end = self.production_on_at or self.phase2_ended_at
        start = self.replica_stop_started_at or self.replica_off_at
        if start and end:
            return end - start
        return None

    @property
    def phase1_duration(self):
        if self.phase1_started_at and self.phase1_ended_at:
            return self.phase1_ended_at - self.phase1_started_at
        return None


class SessionDisk(models.Model):
    """Per-disk progress and evidence of one session."""

    session = models.ForeignKey(FailbackSession, on_delete=models.CASCADE, related_name="disks")
    key = models.CharField(max_length=50)
    capacity_bytes = models.BigIntegerField()
    phase = models.PositiveSmallIntegerField(default=1)
    method = models.CharField(max_length=20, blank=True)  # full | tracked | digest
    method_reason = models.CharField(max_length=300, blank=True)
    bytes_total = models.BigIntegerField(default=0)
    bytes_done = models.BigIntegerField(default=0)
    bytes_written = models.BigIntegerField(default=0)
    rate_bps = models.FloatField(default=0)
    eta_s = models.FloatField(null=True, blank=True)
    change_id = models.CharField(max_length=100, blank=True)  # change tracking id at phase 1 start
    phase1_bytes_written = models.BigIntegerField(default=0)
    phase1_digest = models.CharField(max_length=100, blank=True)
    phase2_bytes_written = models.BigIntegerField(default=0)
    source_digest = models.CharField(max_length=100, blank=True)  # replica disk, after it stopped
    target_digest = models.CharField(max_length=100, blank=True)  # production disk, re-read after phase 2
    verified = models.BooleanField(default=False)

    class Meta:
        ordering = ["key"]
        constraints = [models.UniqueConstraint(fields=["session", "key"], name="unique_disk_key_per_session")]

    @property
    def percent(self):
        if not self.bytes_total:  # nothing to copy yet known: done only once the step said it finished
            return 100 if self.finished else 0
        return min(100, round(100 * self.bytes_done / self.bytes_total))

    @property
    def finished(self):
        return bool(self.method) and self.eta_s == 0 and self.bytes_done >= self.bytes_total


class SchedulerClock(models.Model):
    """The worker's clock next to the database's, written by the watchdog every minute: the clock-skew check."""

    name = models.CharField(max_length=100, primary_key=True)  # the cluster's name
    worker_time = models.DateTimeField()
    db_time = models.DateTimeField()

    @property
    def skew_s(self):
        return (self.worker_time - self.db_time).total_seconds()


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise PermissionError("Audit events are append-only: they cannot be changed.")

    def delete(self):
        raise PermissionError("Audit events are append-only: they cannot be deleted.")


class AuditEvent(models.Model):
    """Append-only trail: who, when, what, from, to, result. Written by the workflow, never updated."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor_name = models.CharField(max_length=150)  # copied: stays readable whatever happens to the user
    action = models.CharField(max_length=50, db_index=True, choices=AuditAction.choices)
    replica = models.ForeignKey(Replica, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    session = models.ForeignKey(FailbackSession, null=True, blank=True, on_delete=models.PROTECT, related_name="events")
    from_state = models.CharField(max_length=30, blank=True)
    to_state = models.CharField(max_length=30, blank=True)
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    detail = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["at", "id"]
        indexes = [
            models.Index(fields=["-at", "-id"], name="audit_newest_first"),  # the audit page, deep pages too
            models.Index(fields=["actor_name", "-at"], name="audit_by_user"),
            # The audit page's user filter compares without case (UPPER on PostgreSQL): its page newest first, and its
            # count from the index alone (the column included: PostgreSQL reads no expression index alone without it)
            models.Index(
                Upper("actor_name"),
                F("at").desc(),
                F("id").desc(),
                include=["actor_name"],
                name="audit_by_user_any_case",
            ),
            models.Index(fields=["action", "-at"], name="audit_by_action"),
        ]

    def __str__(self):
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action} {self.outcome}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise PermissionError("Audit events are append-only: they cannot be changed.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("Audit events are append-only: they cannot be deleted.")


class ApiToken(models.Model):
    """A bearer token for the /api/v1/ automation API, acting as its user with that user's role.

    Only the SHA-256 of the token is stored: the token itself is shown once, when it is created.
    ``prefix`` (``drp_`` and a public id) is not secret and lets a user tell tokens apart."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=20, unique=True)
    key_hash = models.CharField(max_length=64, unique=True)  # hex SHA-256 of the whole token
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.prefix}… ({self.name})"

    @property
    def is_active(self):
        return self.revoked_at is None


class ApprovalRule(models.Model):
    """An action that needs a second person's approval: for every failback, or for one plan's members."""

    action = models.CharField(max_length=30, choices=Approvable.choices)
    plan = models.ForeignKey(FailbackPlan, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["action", "plan_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["action"], condition=models.Q(plan=None), name="one_global_rule_per_action"
            ),
            models.UniqueConstraint(fields=["action", "plan"], name="one_rule_per_action_and_plan"),
        ]


class ApprovalRequest(models.Model):
    """An action asked for and waiting for a second person (approvals.py). It runs as the requester's."""

    class Status(models.TextChoices):
        PENDING = "pending", "Waiting for approval"
        DONE = "done", "Approved and done"
        FAILED = "failed", "Approved, but refused when run"
        REJECTED = "rejected", "Rejected"
        EXPIRED = "expired", "Expired"

    session = models.ForeignKey(FailbackSession, on_delete=models.PROTECT, related_name="approvals")
    action = models.CharField(max_length=30, choices=Approvable.choices)
    params = models.JSONField(default=dict, blank=True)  # the action's own arguments (reason, time, ...)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )  # None: the portal itself (a scheduled switch, the commit policy)
    requested_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_reason = models.CharField(max_length=500, blank=True)
    result = models.TextField(blank=True)

    class Meta:
        ordering = ["-requested_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "action"],
                condition=models.Q(status="pending"),
                name="one_pending_request_per_action",
            )
        ]

    def __str__(self):
        return f"Approval request #{self.pk}: {self.get_action_display()} on failback #{self.session_id}"


from .notifications.models import (  # noqa: E402, F401  (notification models live beside their code)
    Delivery,
    DeliveryAttempt,
    Notification,
    NotificationEndpoint,
    NotificationSubscription,
)
