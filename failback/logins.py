"""Login throttling beyond django-axes' defaults, and how failed logins reach the audit trail.

Throttling: axes counts failures per (user name, address) and per address. It compares its largest count
(the address's, which includes every name tried from it) with one limit, so ``failure_limit`` gives the
address's own limit unless this name has already failed often enough from this address. A password
sprayed across many names is stopped per address, and one name is still stopped after a few tries.

Audit: every failure and lock-out is recorded, but an address does not add one row per attempt without
bound. Within a window (the cool-off time) an address gets its first few rows in full; after that, one
summary row whenever its count reaches 20, 50, 100, 200, 500, … saying how many there were. The trail is
append-only, so the summary is a new row, never an edit of an old one.
"""

from axes.helpers import get_client_username
from axes.models import AccessAttempt
from django.conf import settings
from django.core.cache import cache
from django.db.models import Sum


def failure_limit(request, credentials):
    """AXES_FAILURE_LIMIT: 1 (already reached) once this name failed LOGIN_FAILURE_LIMIT_PER_NAME times from this
    address, else the address's LOGIN_FAILURE_LIMIT_PER_ADDRESS (axes compares it with the address's count)."""
    username = get_client_username(request, credentials)
    address = getattr(request, "axes_ip_address", None)
    if username and address:
        failed = (
            AccessAttempt.objects.filter(username=username, ip_address=address).aggregate(
                n=Sum("failures_since_start")
            )["n"]
            or 0
        )
        if failed >= settings.LOGIN_FAILURE_LIMIT_PER_NAME:
            return 1
    return settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS


def summary_points():
    """20, 50, 100, 200, 500, 1000, …: the counts at which a summary row is written."""
    decade = 10
    while True:
        for step in (2, 5, 10):
            yield decade * step
        decade *= 10


def is_summary_point(count):
    for point in summary_points():
        if point >= count:
            return point == count


def count_event(kind, address):
    """How many ``kind`` events (login_failed, login_locked_out) ``address`` caused in its current window, this one
    included. The window starts at the address's first such event and lasts the cool-off time."""
    key = f"failback:{kind}:{address or '-'}"
    cache.add(key, 0, timeout=settings.LOGIN_AUDIT_WINDOW_S)  # counters expire with the window; incr keeps the expiry
    try:
        return cache.incr(key)
    except ValueError:  # expired between add and incr: a new window
        cache.add(key, 1, timeout=settings.LOGIN_AUDIT_WINDOW_S)
        return 1


def row_to_write(kind, address):
    """(count, 'each' | 'summary' | None): whether this event gets its own row, a summary row, or none."""
    count = count_event(kind, address)
    if count <= settings.LOGIN_AUDIT_ROWS_PER_ADDRESS:
        return count, "each"
    return count, ("summary" if is_summary_point(count) else None)
