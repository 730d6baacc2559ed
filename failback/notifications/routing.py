"""Who is told: the active endpoints an Administrator pointed at the event, and every user who subscribed to
it by e-mail (at the address on their account). Each gets one delivery row, queued after commit."""

import logging
import time

from django.db import transaction
from django_q.tasks import async_task

from .models import Delivery, NotificationEndpoint, NotificationSubscription

log = logging.getLogger(__name__)


def listening(kind):
    """Whether anyone is told about this kind of event (else nothing is written or worked out)."""
    if any(
        kind in events for events in NotificationEndpoint.objects.filter(active=True).values_list("events", flat=True)
    ):
        return True
    subscribed = NotificationSubscription.objects.filter(user__is_active=True).exclude(user__email="")
    return any(kind in events for events in subscribed.values_list("events", flat=True))


def route(notification):
    kind = notification.event
    deliveries = [
        Delivery(notification=notification, endpoint=endpoint, channel=endpoint.kind, recipient=endpoint.target)
        for endpoint in NotificationEndpoint.objects.filter(active=True)
        if kind in endpoint.events and endpoint.target
    ]
    subscriptions = NotificationSubscription.objects.select_related("user").filter(user__is_active=True)
    deliveries += [
        Delivery(
            notification=notification,
            user=sub.user,
            channel=NotificationEndpoint.Kind.EMAIL,
            recipient=sub.user.email,
        )
        for sub in subscriptions
        if kind in sub.events and sub.user.email
    ]
    for delivery in deliveries:
        delivery.save()
        queue(delivery.pk)
    return deliveries


def queue(delivery_id):
    """Hand one delivery to the worker once the current transaction commits. A broker that cannot take it is
    logged, never raised: the periodic sweep queues it again."""

    def send():
        try:
            async_task(
                "failback.notifications.tasks.deliver",
                delivery_id,
                task_name=f"notify-{delivery_id}-{time.time_ns()}",
                group="notify",
            )
        except Exception:
            log.warning("Delivery %s not queued; the sweep will retry it", delivery_id, exc_info=True)

    transaction.on_commit(send)
