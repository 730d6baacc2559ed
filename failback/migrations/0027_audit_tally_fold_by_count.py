"""The audit tally (migrations 0022, 0025) folds its rows every 100th inserting statement, counted by a
sequence, instead of with a chance of 1 in 100 per statement: the tally's size is then bounded (about 100 rows
between folds, plus rows other transactions held), where by chance 300 statements in a row folded nothing about
once in twenty. A sequence is not transactional and takes no lock: writers still never wait on each other."""

from django.db import migrations


FOLD_BY_CHANCE = """CREATE OR REPLACE FUNCTION failback_audit_tally_insert() RETURNS trigger AS $$
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
FOLD_BY_COUNT = FOLD_BY_CHANCE.replace(
    "random() < 0.01", "nextval('failback_audit_tally_tick') % 100 = 0"
)
FORWARD = ["CREATE SEQUENCE IF NOT EXISTS failback_audit_tally_tick", FOLD_BY_COUNT]
BACKWARD = [FOLD_BY_CHANCE, "DROP SEQUENCE IF EXISTS failback_audit_tally_tick"]


def run(statements):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            for sql in statements:
                schema_editor.execute(sql, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [("failback", "0026_plan_guest_gate_and_hooks")]
    operations = [migrations.RunPython(run(FORWARD), run(BACKWARD))]
