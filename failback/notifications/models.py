"""Notification endpoints, users' subscriptions, and the record of every notification and delivery attempt.

Imported by ``failback.models`` (app label ``failback``); the migration is ``failback/migrations/0017_*``.
"""

from django.conf import settings
from django.db import models
from django.utils import timezone


class NotifyEvent(models.TextChoices):
    """What the portal tells people about. Derived in ``notifications.events`` only."""

    STARTED = "started", "Failback started"
    READY_TO_SWITCH = "ready_to_switch", "Phase 1 done: ready to switch"
    SWITCH_STARTED = "switch_started", "Switch started"
    SWITCH_FINISHED = "switch_finished", "Switch finished"
    FAILED = "failed", "Failback failed"
    WAITING = "waiting", "Waiting for commit or undo"
    POLICY_SOON = "policy_soon", "Automatic commit or undo soon"
    COMMITTED = "committed", "Committed"
    UNDONE = "undone", "Undone"
    CANCELLED = "cancelled", "Cancelled"
    PRECHECK_FAILED = "precheck_failed", "Pre-switch check failing"
    APPROVAL_REQUESTED = "approval_requested", "Waiting for a second person's approval"
    WINDOW_MISSED = "window_missed", "Maintenance window missed: the downtime did not fit"
    CONVERGENCE = "convergence", "Writes outpace the copy: the delta will not shrink"


class NotificationEndpoint(models.Model):
    """Where an Administrator sends chosen events: a webhook URL (signed) or a list of e-mail addresses."""

    class Kind(models.TextChoices):
        WEBHOOK = "webhook", "Webhook (JSON, HMAC-SHA256 signed)"
        EMAIL = "email", "E-mail"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.WEBHOOK)
    url = models.URLField(max_length=500, blank=True)  # webhook
    addresses = models.TextField(blank=True)  # e-mail: comma-separated
    secret_encrypted = models.TextField(blank=True, editable=False)  # webhook: Fernet, like vCenter passwords
    events = models.JSONField(default=list, blank=True)  # NotifyEvent values
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def __repr__(self):  # never the secret, not even encrypted
        return f"<NotificationEndpoint {self.name} {self.kind}>"

    def set_secret(self, raw):
        from ..credentials import encrypt

        self.secret_encrypted = encrypt(raw)

    def reveal_secret(self):
        from ..credentials import decrypt

        return decrypt(self.secret_encrypted)

    @property
    def target(self):
        return self.url if self.kind == self.Kind.WEBHOOK else self.addresses

    def event_labels(self):
        return [NotifyEvent(e).label for e in self.events if e in NotifyEvent.values]


class NotificationSubscription(models.Model):
    """The events a user wants by e-mail, at the address on their account."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notify_subscription")
    events = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)


class Notification(models.Model):
    """One thing worth telling, once: ``key`` makes a second derivation of the same moment a no-op."""

    key = models.CharField(max_length=200, unique=True)
    event = models.CharField(max_length=30, choices=NotifyEvent.choices)
    session = models.ForeignKey(
        "failback.FailbackSession", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    title = models.CharField(max_length=300)
    text = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class Delivery(models.Model):
    """One notification to one endpoint or one subscriber; its attempts are below it."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"  # queued, not tried yet
        SENDING = "sending", "Sending"  # an attempt runs now
        RETRYING = "retrying", "Retrying"  # failed; next attempt at next_attempt_at
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"  # every attempt failed

    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="deliveries")
    endpoint = models.ForeignKey(
        NotificationEndpoint, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    channel = models.CharField(max_length=10, choices=NotificationEndpoint.Kind.choices)
    recipient = models.CharField(max_length=500)  # URL or addresses, as they were when it was sent
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["notification", "endpoint"], name="one_delivery_per_endpoint"),
            models.UniqueConstraint(fields=["notification", "user"], name="one_delivery_per_subscriber"),
        ]


class DeliveryAttempt(models.Model):
    """One try and its answer: HTTP status (webhooks), the time it took, and the error if any."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_rows")
    number = models.PositiveIntegerField()
    at = models.DateTimeField(default=timezone.now)
    duration_ms = models.PositiveIntegerField(default=0)
    ok = models.BooleanField(default=False)
    status_code = models.PositiveIntegerField(null=True, blank=True)
    answer = models.CharField(max_length=500, blank=True)  # start of the response body
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [models.UniqueConstraint(fields=["delivery", "number"], name="one_row_per_attempt")]
