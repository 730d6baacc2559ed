"""The audit page's text search, served by an index (migration 0017): it finds exactly the rows whose
detail or data contains the text, whatever its case, as the plain row-by-row comparison did; rows added
later are found too; and the trail stays append-only with the index in place."""

import json

import pytest
from django.db import DatabaseError, connection, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failback import audit_filters
from failback.audit_filters import contains, filtered_events, text_search
from failback.choices import Outcome
from failback.models import AuditEvent

pytestmark = pytest.mark.django_db

ALPHABET = 'abcAB xyz-19:"%_'  # spaces, a quote and LIKE's wildcards are plain characters to the search
words = st.text(alphabet=ALPHABET, min_size=0, max_size=12)
details_ = st.text(alphabet=ALPHABET + "é", min_size=0, max_size=12)  # JSON writes é as \u00e9 on SQLite only


def add(detail, data=None):
    return AuditEvent.objects.create(
        actor_name="olivia", action="commit", outcome=Outcome.OK, detail=detail, data=data or {}
    )


def found(text):
    form, events = filtered_events({"q": text})
    assert form.is_valid(), form.errors
    return set(events.values_list("pk", flat=True))


def expected(text, rows):
    """Case-insensitive containment in the detail or the data as stored (JSON text): the comparison the
    search stood for before it had an index."""
    return {r.pk for r in rows if any(text.lower() in h.lower() for h in (r.detail, json.dumps(r.data)))}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(details=st.lists(details_, min_size=1, max_size=6), reason=words, data=st.data())
def test_it_finds_exactly_the_rows_that_contain_the_text(details, reason, data):
    rows = [add(d, {"reason": reason} if i % 2 else {}) for i, d in enumerate(details)]
    source = data.draw(st.sampled_from(details + [reason, "session"]))
    start = data.draw(st.integers(0, len(source)))
    text = source[start : start + data.draw(st.integers(1, 8))].strip() or "ab"
    text = data.draw(st.sampled_from([text, text.upper(), text.swapcase()])).replace("É", "é")
    assert found(text) & {r.pk for r in rows} == expected(text, rows), (text, details, reason)


def test_it_finds_rows_added_after_the_index_was_built_and_reasons_in_the_data():
    add("Switch now by olivia")
    later = add("Commit failback", {"reason": "CHG-4242 approved"})
    assert found("chg-4242") == {later.pk} and found("CHG-424") == {later.pk}
    assert found("commit FAIL") == {later.pk} and found("switch now") and not found("CHG-9999")
    assert found("ch") >= {later.pk}  # under three characters: compared row by row, still found


def test_a_text_in_many_rows_is_found_as_in_few(monkeypatch):
    rows = [add(f"step {i} of session 7") for i in range(4)]
    few = found("of session 7")
    monkeypatch.setattr(audit_filters, "FEW_MATCHES", 2)  # more matches than that: the plain query
    assert found("of session 7") == few == {r.pk for r in rows}


def test_the_trail_stays_append_only_with_the_index(db):
    row = add("original")
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("UPDATE failback_auditevent SET detail = 'rewritten' WHERE id = %s", [row.pk])
    assert found("original") == {row.pk} and not found("rewritten")


def test_the_search_is_answered_from_the_index_on_either_database():
    """PostgreSQL: the trigram indexes serve the comparison itself. SQLite: the FTS5 trigram table does."""
    add("step 1 of session 4242")
    if connection.vendor == "postgresql":
        query = contains(AuditEvent.objects.order_by(), "session 4242").values("pk")
        expected = ("audit_detail_trgm", "audit_data_trgm")
    else:
        query = text_search(AuditEvent.objects.order_by(), "session 4242").values("pk")
        expected = ("failback_audit_search VIRTUAL TABLE INDEX",)
    sql, params = query.query.sql_with_params()
    explain = "EXPLAIN " if connection.vendor == "postgresql" else "EXPLAIN QUERY PLAN "
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL enable_seqscan = off")  # a few rows would be scanned: is the index usable?
        cursor.execute(explain + sql, params)
        plan = "\n".join(" ".join(str(c) for c in row) for row in cursor.fetchall())
    assert all(e in plan for e in expected), plan
    assert found("session 4242")
