"""Two things the pages and /metrics read on a long history without reading all of it.

- ``session_ended``: the sessions that ended lately (/metrics reads the settled history once an hour and
  the rest at each scrape; the dashboard's recent failures).
- PostgreSQL: the audit trail's row count kept beside it, so the unfiltered audit page does not count
  500,000 rows at every view (``count(*)`` reads every entry of an index: ~70 ms there). Every statement
  that adds audit rows adds one row to ``failback_audit_tally`` holding how many it added, in the same
  transaction, so ``sum(n)`` is exactly the trail's count in any snapshot; now and then (1 statement in
  100) the trigger folds the tally's rows into one, skipping rows another transaction holds (SKIP LOCKED:
  nobody waits). Audit rows are never updated nor deleted (migration 0002); TRUNCATE (Django's flush)
  empties the tally too. SQLite counts its trail fast enough without it.
"""

from django.db import migrations, models

PG_FORWARD = [
    "CREATE TABLE failback_audit_tally (n bigint NOT NULL)",
    "INSERT INTO failback_audit_tally (n) SELECT count(*) FROM failback_auditevent",
    """CREATE FUNCTION failback_audit_tally_insert() RETURNS trigger AS $$
BEGIN
  INSERT INTO failback_audit_tally (n) SELECT count(*) FROM added;
  IF random() < 0.01 THEN
    WITH folded AS (
      DELETE FROM failback_audit_tally
      WHERE ctid = ANY(ARRAY(SELECT ctid FROM failback_audit_tally FOR UPDATE SKIP LOCKED))
      RETURNING n
    )
    INSERT INTO failback_audit_tally (n) SELECT sum(n) FROM folded HAVING count(*) > 0;
  END IF;
  RETURN NULL;
END;
$$ LANGUAGE plpgsql""",
    "CREATE TRIGGER failback_audit_tally_insert AFTER INSERT ON failback_auditevent "
    "REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION failback_audit_tally_insert()",
    """CREATE FUNCTION failback_audit_tally_truncate() RETURNS trigger AS $$
BEGIN
  DELETE FROM failback_audit_tally;
  RETURN NULL;
END;
$$ LANGUAGE plpgsql""",
    "CREATE TRIGGER failback_audit_tally_truncate AFTER TRUNCATE ON failback_auditevent "
    "FOR EACH STATEMENT EXECUTE FUNCTION failback_audit_tally_truncate()",
]
PG_BACKWARD = [
    "DROP TRIGGER IF EXISTS failback_audit_tally_insert ON failback_auditevent",
    "DROP TRIGGER IF EXISTS failback_audit_tally_truncate ON failback_auditevent",
    "DROP FUNCTION IF EXISTS failback_audit_tally_insert()",
    "DROP FUNCTION IF EXISTS failback_audit_tally_truncate()",
    "DROP TABLE IF EXISTS failback_audit_tally",
]


def run(statements):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            for sql in statements:
                schema_editor.execute(sql, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [("failback", "0021_switch_windows")]

    operations = [
        migrations.AddIndex(
            model_name="failbacksession",
            index=models.Index(fields=["ended_at"], name="session_ended"),
        ),
        migrations.RunPython(run(PG_FORWARD), run(PG_BACKWARD)),
    ]
