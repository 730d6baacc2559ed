"""Audited changes to who is told what: Administrators' endpoints, and each user's own e-mail subscriptions.

Secrets are encrypted at rest with the vCenter credentials' keys and never written to the audit trail.
"""

import secrets

from django.db import transaction
from django.utils import timezone

from ..audit import audit, refuse
from ..choices import AuditAction
from .models import NotificationEndpoint, NotificationSubscription, NotifyEvent

MANAGE_PERMISSION = "failback.change_notificationendpoint"


def may_manage(user):
    return user is not None and user.has_perm(MANAGE_PERMISSION)


def _require_admin(actor, action):
    if not may_manage(actor):
        refuse("Notification endpoints are managed by Administrators.", action=action, actor=actor, forbidden=True)


def _clean_events(events, *, action, actor):
    unknown = [e for e in events if e not in NotifyEvent.values]
    if unknown:
        refuse(f"Unknown events: {', '.join(map(str, unknown))}.", action=action, actor=actor)
    return [e for e in NotifyEvent.values if e in events]  # one order, no duplicates


def save_endpoint(actor, endpoint, *, secret=""):
    """Create or change an endpoint. A new webhook without a typed secret gets a generated one, returned
    (shown once); otherwise returns None. Changing a webhook keeps its secret unless a new one is typed."""
    action = AuditAction.NOTIFY_ENDPOINT_SAVED
    _require_admin(actor, action)
    endpoint.events = _clean_events(endpoint.events, action=action, actor=actor)
    if endpoint.kind == NotificationEndpoint.Kind.WEBHOOK and not endpoint.url.startswith(("http://", "https://")):
        refuse("A webhook needs an http:// or https:// URL.", action=action, actor=actor)
    if endpoint.kind == NotificationEndpoint.Kind.EMAIL and not endpoint.addresses.strip():
        refuse("An e-mail endpoint needs at least one address.", action=action, actor=actor)
    created = endpoint.pk is None
    shown = None
    if endpoint.kind == NotificationEndpoint.Kind.WEBHOOK and (secret or not endpoint.secret_encrypted):
        shown = None if secret else secrets.token_urlsafe(32)
        endpoint.set_secret(secret or shown)
    with transaction.atomic():
        endpoint.save()
        audit(
            action=action,
            actor=actor,
            detail=f"Notification endpoint {endpoint.name} {'added' if created else 'changed'}: {endpoint.get_kind_display()} "
            f"to {endpoint.target}, {'active' if endpoint.active else 'paused'}, events: {', '.join(endpoint.event_labels()) or 'none'}"
            + ("; new secret" if secret or shown else ""),
            data={
                "endpoint": endpoint.pk,
                "name": endpoint.name,
                "kind": endpoint.kind,
                "target": endpoint.target,
                "events": endpoint.events,
                "active": endpoint.active,
                "secret_changed": bool(secret or shown),
            },
        )
    return shown


def delete_endpoint(actor, endpoint_id):
    action = AuditAction.NOTIFY_ENDPOINT_DELETED
    _require_admin(actor, action)
    with transaction.atomic():
        endpoint = NotificationEndpoint.objects.select_for_update().filter(pk=endpoint_id).first()
        if endpoint is None:
            return None
        name, target = endpoint.name, endpoint.target
        endpoint.delete()  # its deliveries stay, with the recipient they had
        audit(
            action=action,
            actor=actor,
            detail=f"Notification endpoint {name} ({target}) deleted",
            data={"endpoint": endpoint_id, "name": name},
        )
    return name


def set_subscription(actor, events, *, email=None):
    """A user's own choice of events by e-mail (and their address, when given)."""
    action = AuditAction.NOTIFY_SUBSCRIPTION
    if actor is None or not actor.is_authenticated:
        refuse("Log in to choose your notifications.", action=action, actor=None, forbidden=True)
    events = _clean_events(events, action=action, actor=actor)
    with transaction.atomic():
        if email is not None and email != actor.email:
            actor.email = email
            actor.save(update_fields=["email"])
        NotificationSubscription.objects.update_or_create(
            user=actor, defaults={"events": events, "updated_at": timezone.now()}
        )
        labels = ", ".join(NotifyEvent(e).label for e in events) or "none"
        audit(
            action=action,
            actor=actor,
            detail=f"{actor.get_username()} receives by e-mail at {actor.email or '(no address)'}: {labels}",
            data={"events": events, "email": actor.email},
        )
    return events


def subscribed_events(user):
    sub = NotificationSubscription.objects.filter(user=user).first()
    return sub.events if sub else []
