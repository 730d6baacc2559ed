"""Sending one delivery: one attempt, its answer recorded, the next attempt scheduled with backoff.

An attempt is claimed by compare-and-swap on the delivery's status, so a task delivered twice (or queued
again by the sweep) sends once. A failure is recorded and retried after ``FAILBACK_NOTIFY_RETRY_S``,
doubling each time, up to ``FAILBACK_NOTIFY_ATTEMPTS``; it is never raised into a failback step.
"""

import json
import time
import urllib.error
import urllib.request
from datetime import timedelta

from django.conf import settings
from django.core.mail import EmailMessage
from django.db.models import F
from django.utils import timezone
from django_q.models import Schedule

from . import signing
from .models import Delivery, DeliveryAttempt, NotificationEndpoint
from .routing import queue

ANSWER_MAX = 500


class Failed(Exception):
    def __init__(self, message, status_code=None, answer=""):
        super().__init__(message)
        self.status_code = status_code
        self.answer = answer


def deliver(delivery_id):
    delivery = _claim(delivery_id)
    if delivery is None:
        return None
    started, at = time.monotonic(), timezone.now()
    status_code, answer, error = None, "", ""
    try:
        status_code, answer = _send(delivery)
    except Failed as exc:
        status_code, answer, error = exc.status_code, exc.answer, str(exc)
    except Exception as exc:  # whatever the channel raises is this attempt's answer, not the worker's problem
        error = f"{type(exc).__name__}: {exc}"
    DeliveryAttempt.objects.create(
        delivery=delivery,
        number=delivery.attempts,
        at=at,
        duration_ms=round((time.monotonic() - started) * 1000),
        ok=not error,
        status_code=status_code,
        answer=answer[:ANSWER_MAX],
        error=error[:2000],
    )
    return _after(delivery, error)


def _claim(delivery_id):
    now = timezone.now()
    due = Delivery.objects.filter(pk=delivery_id, status__in=[Delivery.Status.PENDING, Delivery.Status.RETRYING])
    due = due.exclude(next_attempt_at__gt=now + timedelta(seconds=1))
    if due.update(status=Delivery.Status.SENDING, attempts=F("attempts") + 1, updated_at=now) != 1:
        return None
    return Delivery.objects.select_related("notification", "endpoint").get(pk=delivery_id)


def _after(delivery, error):
    now = timezone.now()
    if not error:
        status, when = Delivery.Status.DELIVERED, None
    elif delivery.attempts >= settings.FAILBACK_NOTIFY_ATTEMPTS:
        status, when = Delivery.Status.FAILED, None
    else:
        status = Delivery.Status.RETRYING
        when = now + timedelta(seconds=settings.FAILBACK_NOTIFY_RETRY_S * 2 ** (delivery.attempts - 1))
    Delivery.objects.filter(pk=delivery.pk).update(status=status, next_attempt_at=when, updated_at=now)
    if when is not None:
        # One schedule per attempt, deleted once it fires (ONCE, negative repeats): the scheduler saves the
        # schedule it fired after queuing its task, so re-arming that same row could be overwritten.
        Schedule.objects.update_or_create(
            name=f"notify-retry-{delivery.pk}-{delivery.attempts + 1}",
            defaults={
                "func": "failback.notifications.tasks.deliver",
                "args": str(delivery.pk),
                "schedule_type": Schedule.ONCE,
                "repeats": -1,
                "next_run": when,
            },
        )
    return status


def _send(delivery):
    if delivery.channel == NotificationEndpoint.Kind.WEBHOOK:
        return _post(delivery)
    addresses = [a.strip() for a in delivery.recipient.split(",") if a.strip()]
    notification = delivery.notification
    sent = EmailMessage(
        subject=f"[DR portal] {notification.title}"[:250],
        body=notification.text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=addresses,
        headers={"X-DR-Portal-Event": notification.event},
    ).send()
    return None, f"accepted for {sent and ', '.join(addresses)}"


def body_of(delivery):
    notification = delivery.notification
    return {
        "notification": notification.pk,
        "delivery": delivery.pk,
        "event": notification.event,
        "title": notification.title,
        "text": notification.text,
        "created_at": notification.created_at.isoformat(),
        **notification.data,
    }


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a moved endpoint is a failure to fix, not to follow
        return None


def _post(delivery):
    if delivery.endpoint is None:
        raise Failed("The endpoint was deleted")
    body = json.dumps(body_of(delivery), separators=(",", ":")).encode()
    timestamp = int(time.time())
    request = urllib.request.Request(
        delivery.recipient,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "dr-portal-notifications",
            signing.TIMESTAMP_HEADER: str(timestamp),
            signing.SIGNATURE_HEADER: signing.sign(delivery.endpoint.reveal_secret(), timestamp, body),
            signing.EVENT_HEADER: delivery.notification.event,
            signing.DELIVERY_HEADER: str(delivery.pk),
        },
    )
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=settings.FAILBACK_WEBHOOK_TIMEOUT_S) as answer:
            return answer.status, answer.read(ANSWER_MAX).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        text = exc.read(ANSWER_MAX).decode(errors="replace") if exc.fp else ""
        raise Failed(f"HTTP {exc.code} {exc.reason}", exc.code, text) from None
    except urllib.error.URLError as exc:
        raise Failed(f"{type(exc.reason).__name__}: {exc.reason}") from None
    except TimeoutError as exc:
        raise Failed(f"TimeoutError: no answer within {settings.FAILBACK_WEBHOOK_TIMEOUT_S:g} s ({exc})") from None


def sweep(now=None):
    """Deliveries whose task or schedule was lost (broker down, worker killed mid-send) are queued again."""
    now = now or timezone.now()
    stale = now - timedelta(minutes=2)
    lost = list(
        Delivery.objects.filter(status=Delivery.Status.PENDING, updated_at__lt=stale).values_list("pk", flat=True)
    )
    lost += Delivery.objects.filter(status=Delivery.Status.RETRYING, next_attempt_at__lt=stale).values_list(
        "pk", flat=True
    )
    hung = now - timedelta(seconds=settings.FAILBACK_WEBHOOK_TIMEOUT_S + 120)
    for pk in Delivery.objects.filter(status=Delivery.Status.SENDING, updated_at__lt=hung).values_list("pk", flat=True):
        if Delivery.objects.filter(pk=pk, status=Delivery.Status.SENDING).update(
            status=Delivery.Status.RETRYING, next_attempt_at=now, updated_at=now
        ):
            lost.append(pk)
    for pk in lost:
        queue(pk)
    return lost
