"""The database itself refuses to change audit rows, whatever code (or person with a SQL shell) tries.

UPDATE is refused on SQLite and PostgreSQL. DELETE is refused on PostgreSQL; TRUNCATE (an owner's
maintenance operation, also how the test suite resets tables) stays possible. On SQLite a DELETE
trigger would break Django's table flush, so deletion is refused by the model and its queryset only.
"""

from django.db import migrations

PG_FORWARD = """
CREATE OR REPLACE FUNCTION failback_audit_append_only() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'audit events are append-only (% refused)', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER failback_auditevent_no_update BEFORE UPDATE OR DELETE ON failback_auditevent
  FOR EACH ROW EXECUTE FUNCTION failback_audit_append_only();
"""
PG_BACKWARD = """
DROP TRIGGER IF EXISTS failback_auditevent_no_update ON failback_auditevent;
DROP FUNCTION IF EXISTS failback_audit_append_only();
"""
SQLITE_FORWARD = """
CREATE TRIGGER failback_auditevent_no_update BEFORE UPDATE ON failback_auditevent
BEGIN SELECT RAISE(ABORT, 'audit events are append-only (UPDATE refused)'); END;
"""
SQLITE_BACKWARD = "DROP TRIGGER IF EXISTS failback_auditevent_no_update;"


def forward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FORWARD, params=None)
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE_FORWARD)


def backward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_BACKWARD, params=None)
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE_BACKWARD)


class Migration(migrations.Migration):
    dependencies = [("failback", "0001_initial")]
    operations = [migrations.RunPython(forward, backward)]
