"""An index for the audit page's text search (the detail and the structured data), so a search stays fast
as the append-only trail grows.

PostgreSQL: trigram GIN indexes (pg_trgm) on the very expressions the search compares,
``UPPER(detail)`` and ``UPPER(data::text)``, so the case-insensitive substring search keeps its meaning and
uses them. SQLite: an FTS5 table with the trigram tokenizer (substring matches, case-insensitive) whose
content is the audit table itself, kept in step by triggers: a row added is indexed, a row removed (only
Django's flush does that; the model refuses) leaves it. Audit rows are never updated (migration 0002's
trigger refuses), so no update trigger is needed, and none of this lets a row change.
"""

from django.db import migrations

PG_FORWARD = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX IF NOT EXISTS audit_detail_trgm ON failback_auditevent USING gin (UPPER(detail) gin_trgm_ops)",
    "CREATE INDEX IF NOT EXISTS audit_data_trgm ON failback_auditevent USING gin (UPPER(data::text) gin_trgm_ops)",
]
PG_BACKWARD = ["DROP INDEX IF EXISTS audit_detail_trgm", "DROP INDEX IF EXISTS audit_data_trgm"]

SQLITE_FORWARD = [
    "CREATE VIRTUAL TABLE failback_audit_search USING fts5("
    "detail, data, content='failback_auditevent', content_rowid='id', tokenize='trigram')",
    "CREATE TRIGGER failback_audit_search_insert AFTER INSERT ON failback_auditevent BEGIN "
    "INSERT INTO failback_audit_search(rowid, detail, data) VALUES (new.id, new.detail, new.data); END",
    "CREATE TRIGGER failback_audit_search_delete AFTER DELETE ON failback_auditevent BEGIN "
    "INSERT INTO failback_audit_search(failback_audit_search, rowid, detail, data) "
    "VALUES ('delete', old.id, old.detail, old.data); END",
    "INSERT INTO failback_audit_search(failback_audit_search) VALUES ('rebuild')",  # the rows already there
]
SQLITE_BACKWARD = [
    "DROP TRIGGER IF EXISTS failback_audit_search_insert",
    "DROP TRIGGER IF EXISTS failback_audit_search_delete",
    "DROP TABLE IF EXISTS failback_audit_search",
]


def run(statements):
    def apply(apps, schema_editor):
        vendor = schema_editor.connection.vendor
        for sql in statements.get(vendor, []):
            schema_editor.execute(sql, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [("failback", "0016_audit_action_lab")]
    operations = [
        migrations.RunPython(
            run({"postgresql": PG_FORWARD, "sqlite": SQLITE_FORWARD}),
            run({"postgresql": PG_BACKWARD, "sqlite": SQLITE_BACKWARD}),
        )
    ]
