"""The admin's and the auditor's pages: dashboard, replica filters, audit filters and exports, report."""

import csv
import io
import json

import pytest
from django.test import Client
from django.urls import reverse

from failback import workflow
from failback.choices import Outcome, ReplicaState, SwitchMode
from failback.models import AuditEvent, Replica

from .helpers import replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def logged_in(user):
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def history(lab, operator, viewer):
    """One committed failback, one waiting for a decision, one refused attempt."""
    committed = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO, reason="CHG-100")
    workflow.commit(operator, committed.pk, reason="app owner OK")
    waiting = start(operator, replica_named("app-erp"), switch_mode=SwitchMode.AUTO, shutdown_timeout_s=1)
    with pytest.raises(workflow.Refused):
        workflow.undo(viewer, waiting.pk)
    return committed, waiting


def test_it_shows_the_dashboard_sections(history, operator):
    committed, waiting = history
    page = logged_in(operator).get(reverse("failback:dashboard")).content.decode()
    assert "Waiting for commit or undo (1)" in page and f"#{waiting.pk}" in page
    assert "Running (0)" in page and "Recent failures" in page
    assert 'href="/replicas/?state=failover"' in page


def test_it_filters_searches_and_sorts_replicas(lab, operator):
    Replica.objects.filter(name__startswith="web-01").update(state=ReplicaState.READY)
    client = logged_in(operator)
    page = client.get(reverse("failback:replicas"), {"state": "ready"}).content.decode()
    assert "web-01_replica" in page and "app-crm-01_replica" not in page
    page = client.get(reverse("failback:replicas"), {"q": "crm"}).content.decode()
    assert "app-crm-01_replica" in page and "web-01_replica" not in page
    page = client.get(reverse("failback:replicas"), {"sort": "-name"}).content.decode()
    assert page.index("web-01_replica") < page.index("app-crm-01_replica")


def test_it_paginates_thousands_of_replicas(lab, operator):
    Replica.objects.bulk_create(
        Replica(name=f"bulk-{i:04d}_replica", source_name=f"bulk-{i:04d}", vm_id=f"x{i}", host="esx-dr-01")
        for i in range(120)
    )
    page = logged_in(operator).get(reverse("failback:replicas"), {"q": "bulk", "page": 3}).content.decode()
    assert "Page 3 of 3" in page and "bulk-0119_replica" in page and "bulk-0000_replica" not in page
    assert "124 replicas" not in page and "120 replicas" in page


def test_it_filters_the_audit_trail(history, viewer):
    client = logged_in(viewer)  # viewers read the audit trail
    page = client.get(reverse("failback:audit"), {"outcome": "refused"}).content.decode()
    assert "1 event" in page and "victor" in page and 'title="finish_commit"' not in page
    assert '<option value="finish_commit">Finish commit</option>' in page  # the filter offers every action by its label
    page = client.get(reverse("failback:audit"), {"q": "CHG-100"}).content.decode()
    assert 'title="start_failback"' in page
    page = client.get(reverse("failback:audit"), {"user": "olivia", "action": "commit"}).content.decode()
    assert "1 event" in page
    page = client.get(reverse("failback:audit"), {"since": "2030-01-02", "until": "2030-01-01"}).content.decode()
    assert "The start date is after the end date." in page


def test_it_exports_the_filtered_audit_as_csv_and_json(history, viewer):
    client = logged_in(viewer)
    response = client.get(reverse("failback:audit_export", args=["csv"]), {"outcome": "refused"})
    assert response["Content-Type"].startswith("text/csv") and "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0][:3] == ["at", "actor", "action"] and len(rows) == 2 and rows[1][1] == "victor"
    data = json.loads(b"".join(client.get(reverse("failback:audit_export", args=["json"])).streaming_content))
    assert len(data) == AuditEvent.objects.count() and {"at", "actor", "action", "outcome", "detail"} <= set(data[0])


@pytest.mark.security
def test_it_neutralises_formulas_in_the_csv_export(lab, operator):
    with pytest.raises(workflow.Refused):
        start(operator, replica_named("app-crm"), vm_name='=HYPERLINK("http://x")')
    AuditEvent.objects.create(actor_name="=cmd|' /C calc'!A0", action="note", outcome=Outcome.INFO, detail="+1+1")
    body = b"".join(logged_in(operator).get(reverse("failback:audit_export", args=["csv"])).streaming_content).decode()
    rows = list(csv.reader(io.StringIO(body)))
    cells = [cell for row in rows[1:] for cell in row]
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)
    assert "'=cmd|' /C calc'!A0" in cells and "'+1+1" in cells


def test_it_prints_a_report_with_checksums_and_deciders(history, viewer):
    committed, _ = history
    page = logged_in(viewer).get(reverse("failback:report", args=[committed.pk])).content.decode()
    assert "xxh3-tree" in page and "identical" in page and "Switch window" in page
    assert "Commit: olivia" in page and "app owner OK" in page and "CHG-100" in page
    assert "@media print" not in page  # the print rules live in the stylesheet


def test_it_draws_the_throughput_chart(history, operator):
    committed, _ = history
    page = logged_in(operator).get(reverse("failback:session", args=[committed.pk])).content.decode()
    assert "Throughput" in page and ("<svg" in page or "once data is moving" in page)
