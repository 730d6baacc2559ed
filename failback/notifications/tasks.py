"""django-q2 entry points of notifications: primary keys in, one call each. No rules here."""

from . import delivery, events


def notify_audit(row_id):
    events.notify_audit(int(row_id))


def deliver(delivery_id):
    delivery.deliver(int(delivery_id))


def periodic():
    """Every minute: the moments no audit row marks, and deliveries whose task was lost."""
    events.periodic()
    delivery.sweep()
