"""The audit tally (migration 0022) folds its rows only in a READ COMMITTED transaction, Django's default: under
REPEATABLE READ or SERIALIZABLE, locking a tally row another transaction folded away since the snapshot would
fail the audit write with a serialization error. The count stays exact either way; only the folding waits."""

from django.db import migrations

FOLD_WHEN_READ_COMMITTED = """CREATE OR REPLACE FUNCTION failback_audit_tally_insert() RETURNS trigger AS $$
BEGIN
  INSERT INTO failback_audit_tally (n) SELECT count(*) FROM added;
  IF random() < 0.01 AND current_setting('transaction_isolation') = 'read committed' THEN
    WITH folded AS (
      DELETE FROM failback_audit_tally
      WHERE ctid = ANY(ARRAY(SELECT ctid FROM failback_audit_tally FOR UPDATE SKIP LOCKED))
      RETURNING n
    )
    INSERT INTO failback_audit_tally (n) SELECT sum(n) FROM folded HAVING count(*) > 0;
  END IF;
  RETURN NULL;
END;
$$ LANGUAGE plpgsql"""
FOLD_ALWAYS = FOLD_WHEN_READ_COMMITTED.replace(" AND current_setting('transaction_isolation') = 'read committed'", "")


def run(sql):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [("failback", "0024_audit_by_user_any_case")]
    operations = [migrations.RunPython(run(FOLD_WHEN_READ_COMMITTED), run(FOLD_ALWAYS))]
