"""The audit trail is append-only, down to the database."""

import pytest
from django.db import DatabaseError, connection, transaction

from failback.choices import Outcome
from failback.models import AuditEvent

pytestmark = pytest.mark.django_db(databases="__all__")


@pytest.fixture
def row(db):
    return AuditEvent.objects.create(actor_name="olivia", action="commit", outcome=Outcome.OK, detail="original")


def test_it_refuses_to_change_a_row_through_the_model(row):
    row.detail = "rewritten"
    with pytest.raises(PermissionError):
        row.save()
    with pytest.raises(PermissionError):
        AuditEvent.objects.filter(pk=row.pk).update(detail="rewritten")
    assert AuditEvent.objects.get(pk=row.pk).detail == "original"


def test_it_refuses_to_delete_a_row_through_the_model(row):
    with pytest.raises(PermissionError):
        row.delete()
    with pytest.raises(PermissionError):
        AuditEvent.objects.all().delete()
    assert AuditEvent.objects.filter(pk=row.pk).exists()


def test_it_refuses_a_raw_sql_update(row):
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("UPDATE failback_auditevent SET detail = 'rewritten' WHERE id = %s", [row.pk])
    assert AuditEvent.objects.get(pk=row.pk).detail == "original"


def test_a_refusal_cannot_be_written_inside_a_callers_transaction():
    """A refusal's row must outlive the refused work: refuse() runs in a durable transaction, so calling it
    inside another transaction is an error at once rather than a row that a rollback silently takes away."""
    from failback.audit import Refused, refuse

    with pytest.raises(RuntimeError, match="durable"), transaction.atomic():
        refuse("not now", action="commit")
    with pytest.raises(Refused):
        refuse("not now", action="commit")
    assert AuditEvent.objects.filter(action="commit", outcome=Outcome.REFUSED).count() == 1


def test_an_action_with_another_spelling_is_not_written():
    from failback.audit import audit

    with pytest.raises(ValueError):
        audit(action="plan_switch", detail="the old spelling of switch_plan")
    assert not AuditEvent.objects.filter(action="plan_switch").exists()
