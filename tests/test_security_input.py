"""Untrusted text and bad input. Names come from vCenter or the lab and reasons are typed by users:
with hostile values, every page, websocket fragment and export must keep them inert (HTML-escaped,
CSV formulas neutralised, JSON valid). Bad input gets a clear message and changes nothing. vCenter
passwords are encrypted at rest and appear in no page, audit row, export or log line.
"""

import csv
import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
from datetime import timedelta
from html import unescape
from html.parser import HTMLParser

import pytest
from channels.testing import WebsocketCommunicator
from cryptography.fernet import Fernet
from django.conf import settings as django_settings
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from dr_portal.asgi import application
from failback import connections, plans, tokens, workflow
from failback.choices import CommitPolicy, Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.credentials import decrypt
from failback.models import AuditEvent, FailbackSession, Replica, VCenterConnection

from .conftest import ROOT
from .helpers import network_map, put_session_in, replica_named, start
from .security_support import (  # noqa: F401 (an autouse fixture)
    MiB,
    closed_port,
    db_state,
    empty_lab,
    fast_password_hashing,
    import_replicas,
)

pytestmark = pytest.mark.security

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    '=HYPERLINK("http://x","y")',
    "+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "\u202etxt.exe",  # right-to-left override: shows as "exe.txt"
    "L" * 150,  # longer than vCenter allows (80)
]
MARKUP = [p for p in HOSTILE if set(p) & set("<>\"'&")]  # what would be live markup if it reached a page raw
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@pytest.fixture
def lab(db, settings):
    return empty_lab()


def logged_in(user):
    client = Client()
    client.force_login(user)
    return client


def add_hostile_replicas(lab, payloads=HOSTILE):
    """Hosts, networks and replica VMs named with the payloads, made through the lab's own API and imported by seed_lab."""
    for name in payloads:
        lab.add_host(name)
        lab.add_network(name)
        lab.create_vm(
            f"{name}_replica",
            host=name,
            datastore="dr-ds-01",
            disks=[4 * MiB],
            networks=[name],
            power_on=True,
            shutdown_seconds=0.2,
        )
    import_replicas()
    return [Replica.objects.get(name=f"{name}_replica") for name in payloads]


class Hostile:
    """One of everything, named with the payloads."""

    def __init__(self, lab, operator, admin):
        self.replicas = add_hostile_replicas(lab)
        self.sessions = []
        for i, (name, replica) in enumerate(zip(HOSTILE, self.replicas, strict=False)):
            self.sessions.append(
                workflow.start_failback(
                    operator,
                    replica.pk,
                    vm_name=f"prod-{i}",
                    target_host=name,
                    target_datastore="prod-ds-01",
                    network_map={name: name},
                    reason=name[:500],
                )
            )
        ready, waiting, failed = self.sessions[1], self.sessions[2], self.sessions[3]
        put_session_in(ready, SessionStatus.READY_TO_SWITCH)  # builds the production VM on a datastore the lab has
        put_session_in(waiting, SessionStatus.FAILBACK)
        # vCenter datastore names are free text; the lab's are directory names, so they are written as the sync writes them.
        FailbackSession.objects.filter(pk__in=[s.pk for s in self.sessions]).update(target_datastore=HOSTILE[1])
        workflow.schedule_switch(operator, ready.pk, timezone.now() + timedelta(hours=2), reason=HOSTILE[4])
        FailbackSession.objects.filter(pk=failed.pk).update(
            status=SessionStatus.FAILED,
            ended_at=timezone.now(),
            error=f"vCenter: The name '{HOSTILE[0]}' already exists. {HOSTILE[1]}",
        )
        Replica.objects.filter(pk=failed.replica_id).update(
            state=ReplicaState.READY
        )  # offers "Declare failover" (a JS confirm)
        # Reasons typed by users, through the pages.
        client = logged_in(operator)
        client.post(reverse("failback:action", args=[waiting.pk, "undo"]), {"reason": HOSTILE[0]})
        client.post(
            reverse("failback:action", args=[self.sessions[0].pk, "commit"]), {"reason": HOSTILE[1]}
        )  # refused: audited with its reason
        members = [
            {
                "replica_id": r.pk,
                "vm_name": f"{r.source_name}-prod",
                "target_host": HOSTILE[0],
                "target_datastore": "prod-ds-01",
                "network_map": network_map(r),
            }
            for r in (replica_named("web-01"), replica_named("db-sql-01"))
        ]
        self.plan = plans.start_plan(operator, name=HOSTILE[1], members=members, reason=HOSTILE[0])
        self.connection = connections.save_connection(
            admin,
            VCenterConnection(
                name=HOSTILE[0],
                host="127.0.0.1",
                port=closed_port(),
                username=HOSTILE[1],
                replica_suffix=HOSTILE[2][:50],
            ),
            password="vc-Pa55word",
        )
        VCenterConnection.objects.filter(pk=self.connection.pk).update(
            inventory={"vms": [{"vm_id": "vm-7", "name": HOSTILE[1], "host": HOSTILE[0]}]},
            sync_error=HOSTILE[0],
            last_test_result=f"Failed: {HOSTILE[1]}",
        )
        tokens.issue(admin, admin, HOSTILE[0])
        Client().post(
            reverse("login"), {"username": HOSTILE[2], "password": "guess"}
        )  # a failed login: the name typed goes to the audit trail


@pytest.fixture
def hostile(lab, operator, admin_user):
    return Hostile(lab, operator, admin_user)


class Markup(HTMLParser):
    """What in a page could run: inline scripts, injected elements, event handlers, javascript: URLs."""

    def __init__(self):
        super().__init__()
        self.inline_scripts, self.injected, self.handlers, self.urls = [], [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and not (attrs.get("src") or "").startswith("/static/"):
            self.inline_scripts.append(attrs)
        if tag in ("img", "iframe", "object", "embed"):
            self.injected.append((tag, attrs))
        self.handlers += [(k, v) for k, v in attrs.items() if k.startswith("on")]
        self.urls += [v for k, v in attrs.items() if k in ("href", "src", "action", "formaction") and v]


def assert_inert(html):
    for payload in MARKUP:
        assert payload not in html, f"unescaped: {payload!r}"
    found = Markup()
    found.feed(html)
    assert not found.inline_scripts and not found.injected
    assert (
        not found.handlers
    ), found.handlers  # none at all: the Content-Security-Policy would block them (portal.js does confirm)
    assert not any(unescape(url).strip().lower().startswith(("javascript:", "data:")) for url in found.urls)
    assert any(escape(p) in html for p in MARKUP), "the page shows none of the hostile names: the check proves nothing"


PAGES = {
    "dashboard": lambda h: reverse("failback:dashboard"),
    "replicas": lambda h: reverse("failback:replicas"),
    "replicas searched": lambda h: reverse("failback:replicas") + "?q=" + HOSTILE[1],
    "start failback form": lambda h: reverse("failback:start", args=[h.replicas[7].pk]),
    "sessions": lambda h: reverse("failback:sessions"),
    "session queued": lambda h: reverse("failback:session", args=[h.sessions[0].pk]),
    "session ready to switch": lambda h: reverse("failback:session", args=[h.sessions[1].pk]),
    "session undoing": lambda h: reverse("failback:session", args=[h.sessions[2].pk]),
    "session failed": lambda h: reverse("failback:session", args=[h.sessions[3].pk]),
    "report": lambda h: reverse("failback:report", args=[h.sessions[2].pk]),
    "report of the failed session": lambda h: reverse("failback:report", args=[h.sessions[3].pk]),
    "audit": lambda h: reverse("failback:audit"),
    "audit filtered": lambda h: reverse("failback:audit") + f"?q={HOSTILE[1]}&user={HOSTILE[0]}",
    "plans": lambda h: reverse("failback:plans"),
    "plan": lambda h: reverse("failback:plan", args=[h.plan.pk]),
    "new plan form": lambda h: reverse("failback:plan_new")
    + "?"
    + "&".join(f"replica={r.pk}" for r in h.replicas[4:7]),
    "connections": lambda h: reverse("failback:connections"),
    "connection": lambda h: reverse("failback:connection", args=[h.connection.pk]),
    "connection form": lambda h: reverse("failback:connection_edit", args=[h.connection.pk]),
    "api tokens": lambda h: reverse("failback:tokens"),
}


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("page", PAGES)
def test_it_keeps_hostile_names_and_reasons_inert_on_every_page(hostile, admin_user, page):
    response = logged_in(admin_user).get(PAGES[page](hostile))
    assert response.status_code == 200
    assert_inert(response.content.decode())


@pytest.mark.django_db(databases="__all__")
def test_it_escapes_the_login_pages_next_parameter(db):
    html = Client().get(reverse("login") + "?next=" + HOSTILE[1]).content.decode()
    assert HOSTILE[1] not in html and escape(HOSTILE[1]) in html


@pytest.mark.django_db(databases="__all__")
def test_it_keeps_the_right_to_left_override_inside_its_name(hostile, admin_user):
    """The override is shown (it is the name), escaped like any text; the page's markup around it is unchanged."""
    html = logged_in(admin_user).get(reverse("failback:replicas")).content.decode()
    row = html.split(f'id="replica-{hostile.replicas[6].pk}"')[1].split("</tr>")[0]
    assert f"<td>{HOSTILE[6]}_replica</td>" in row


# -- exports -----------------------------------------------------------------------------------


@pytest.mark.django_db(databases="__all__")
def test_it_neutralises_every_formula_in_the_csv_export(hostile, viewer):
    body = b"".join(logged_in(viewer).get(reverse("failback:audit_export", args=["csv"])).streaming_content).decode()
    rows = list(csv.reader(io.StringIO(body)))
    cells = [cell for row in rows[1:] for cell in row]
    assert not [cell for cell in cells if cell.startswith(FORMULA_START)]
    header = rows[0]
    replicas = {row[header.index("replica")] for row in rows[1:]}
    actors = {row[header.index("actor")] for row in rows[1:]}
    for payload in HOSTILE[2:6]:  # the formula payloads, as replica names: kept, with a quote in front
        assert f"'{payload}_replica" in replicas
    assert f"'{HOSTILE[2]}" in actors  # the user name typed at the login page
    assert len(rows) - 1 == AuditEvent.objects.count()


@pytest.mark.django_db(databases="__all__")
def test_it_exports_hostile_text_as_valid_json_unchanged(hostile, viewer):
    body = b"".join(logged_in(viewer).get(reverse("failback:audit_export", args=["json"])).streaming_content)
    rows = json.loads(body)
    assert len(rows) == AuditEvent.objects.count()
    assert {f"{p}_replica" for p in HOSTILE} <= {row["replica"] for row in rows}  # exact: JSON needs no neutralising
    assert any(row["data"].get("reason") == HOSTILE[0] for row in rows if row["action"] == "undo")
    assert any(row["actor"] == HOSTILE[2] for row in rows if row["action"] == "login_failed")


# -- websocket fragments -----------------------------------------------------------------------


def cookie_for(user):
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def sync(fn):
    from asgiref.sync import sync_to_async

    return sync_to_async(fn)


@pytest.fixture
def hostile_session(lab, operator):
    """A session of a replica named with markup, failed with vCenter's message quoting the names, its reasons hostile."""
    replicas = add_hostile_replicas(lab, MARKUP[:2])
    session = workflow.start_failback(
        operator,
        replicas[0].pk,
        vm_name="prod-1",
        target_host=MARKUP[1],
        target_datastore="prod-ds-01",
        network_map={MARKUP[0]: MARKUP[1]},
        reason=MARKUP[1],
        switch_mode=SwitchMode.MANUAL,
    )
    session = put_session_in(FailbackSession.objects.get(pk=session.pk), SessionStatus.FAILBACK)
    with pytest.raises(workflow.Refused):
        workflow.switch_now(
            operator, session.pk, reason=MARKUP[0]
        )  # refused (already switched): audited with its reason
    return session


@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.asyncio
async def test_it_escapes_hostile_names_in_websocket_fragments(hostile_session, operator):
    cookie = await sync(cookie_for)(operator)
    for path in (f"/ws/sessions/{hostile_session.pk}/", "/ws/dashboard/"):
        ws = WebsocketCommunicator(application, path, headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)])
        connected, _ = await ws.connect()
        assert connected
        html = await ws.receive_from(timeout=10)
        await ws.disconnect()
        assert 'hx-swap-oob="true"' in html
        assert_inert(html)
        assert escape(f"{MARKUP[0]}_replica") in html


# -- bad input: a clear message, nothing changed ------------------------------------------------


@pytest.fixture
def session(lab, operator):
    return put_session_in(start(operator, replica_named("app-crm")), SessionStatus.READY_TO_SWITCH)


def htmx_post(user, url, data):
    return logged_in(user).post(url, data, HTTP_HX_REQUEST="true")


def refusals(action):
    return list(AuditEvent.objects.filter(action=action, outcome=Outcome.REFUSED).values_list("detail", flat=True))


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize(
    "when,status,message,audited",
    [
        (lambda: timezone.localtime() - timedelta(hours=1), 409, "is in the past; pick a time in the future", True),
        (
            lambda: timezone.localtime() + timedelta(seconds=2),
            409,
            "is in the past; pick a time in the future",
            True,
        ),  # within the 5 s margin
        (lambda: timezone.localtime() + timedelta(days=400), 409, "more than a year away", True),
        (lambda: "2026-02-31T25:61", 400, "Enter a valid date/time", False),
        (lambda: "tomorrow at nine", 400, "Enter a valid date/time", False),
        (lambda: "", 400, "This field is required", False),
    ],
)
def test_it_refuses_bad_switch_times_and_changes_nothing(session, operator, when, status, message, audited):
    value = when()
    value = value.strftime("%Y-%m-%d %H:%M:%S") if hasattr(value, "strftime") else value
    before = db_state()
    response = htmx_post(operator, reverse("failback:action", args=[session.pk, "schedule"]), {"switch_at": value})
    assert response.status_code == status and message in response.content.decode()
    assert db_state() == before
    if audited:  # form errors stop before the service layer, which is what audits
        assert [message in d for d in refusals("schedule_switch")] == [True]


@pytest.mark.django_db(databases="__all__")
def test_it_refuses_a_plan_switch_time_in_the_past(lab, operator):
    members = [
        {
            "replica_id": r.pk,
            "vm_name": f"{r.source_name}-prod",
            "target_host": "esx-prod-01",
            "target_datastore": "prod-ds-01",
            "network_map": network_map(r),
        }
        for r in (replica_named("web-01"),)
    ]
    plan = plans.start_plan(operator, name="wave", members=members)
    before = db_state()
    past = (timezone.localtime() - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M")
    page = (
        logged_in(operator)
        .post(reverse("failback:plan_action", args=[plan.pk, "schedule"]), {"switch_at": past}, follow=True)
        .content.decode()
    )
    assert "is in the past" in page and db_state() == before
    assert refusals("schedule_plan_switch")


def start_form(replica, **overrides):
    data = {
        "vm_name": f"{replica.source_name}-prod",
        "target_host": "esx-prod-01",
        "target_datastore": "prod-ds-01",
        "switch_mode": SwitchMode.MANUAL,
        "commit_policy": CommitPolicy.NONE,
        **{f"net_nic{i}": target for i, target in enumerate(network_map(replica).values())},
    }
    data.update(overrides)
    return data


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize(
    "overrides,message,audited",
    [
        (
            {"target_host": "esx-nowhere"},
            "Select a valid choice. esx-nowhere is not one of the available choices.",
            False,
        ),
        ({"target_datastore": HOSTILE[1]}, "Select a valid choice.", False),
        ({"net_nic0": "dmz-of-another-site"}, "Select a valid choice.", False),
        ({"vm_name": "v" * 81}, "Ensure this value has at most 80 characters", False),
        ({"reason": "r" * 501}, "Ensure this value has at most 500 characters", False),
        ({"bandwidth_mbps": "0"}, "Ensure this value is greater than or equal to 1", False),
        ({"switch_mode": "whenever"}, "Select a valid choice. whenever is not one of the available choices.", False),
        (
            {"vm_name": HOSTILE[0]},
            "The production VM name must be 1-80 letters, digits, dots, dashes or underscores",
            True,
        ),
        (
            {"vm_name": "db-sql-01_replica"},
            "A VM named &#x27;db-sql-01_replica&#x27; already exists; pick another name.",
            True,
        ),
        ({"switch_mode": SwitchMode.SCHEDULED, "switch_at": "2001-01-01T00:00"}, "is in the past", True),
    ],
)
def test_it_refuses_bad_start_input_and_changes_nothing(lab, operator, overrides, message, audited):
    replica = replica_named("web-01")
    before = db_state()
    response = logged_in(operator).post(reverse("failback:start", args=[replica.pk]), start_form(replica, **overrides))
    html = response.content.decode()
    assert response.status_code == 400 and message in html
    assert db_state() == before and not FailbackSession.objects.exists()
    if audited:  # form errors stop before the service layer, which is what audits
        assert len(refusals("start_failback")) == 1
    assert_no_markup(html)


def assert_no_markup(html):
    for payload in MARKUP:
        assert payload not in html


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize(
    "options,message",
    [
        ({"target_host": "esx-nowhere"}, "Unknown target host 'esx-nowhere'."),
        ({"target_datastore": "ds-nowhere"}, "Unknown target datastore 'ds-nowhere'."),
        ({"network_map": {"dr-dmz": "prod-dmz"}}, "dr-net not mapped"),
        ({"network_map": {"dr-net": "lan-9", "dr-dmz": None}}, "Unknown target network 'lan-9'."),
        ({"reason": "r" * 501}, "The reason is too long (501 characters; at most 500)."),
        ({"bandwidth_mbps": 100_001}, "The bandwidth limit must be between 1 and 100000 MB/s (or none)."),
        ({"switch_mode": "whenever"}, "Unknown switch mode 'whenever'"),
    ],
)
def test_it_refuses_bad_input_at_the_service_layer_and_audits_it(lab, operator, options, message):
    """What the forms cannot catch (or a script sends straight to the service functions, as the API does)."""
    before = db_state()
    with pytest.raises(workflow.Refused) as refused:
        start(operator, replica_named("app-crm"), **options)
    assert message in refused.value.message
    assert db_state() == before
    assert [message in d for d in refusals("start_failback")] == [True]


@pytest.mark.django_db(databases="__all__")
def test_it_refuses_oversized_reasons_on_every_action_form(session, operator):
    before = db_state()
    for action in ("switch", "schedule", "commit", "undo"):
        response = htmx_post(
            operator,
            reverse("failback:action", args=[session.pk, action]),
            {"reason": "r" * 501, "switch_at": "2099-01-01T00:00"},
        )
        assert (
            response.status_code == 400
            and "Ensure this value has at most 500 characters (it has 501)." in response.content.decode()
        )
    assert db_state() == before


@pytest.mark.django_db(databases="__all__")
def test_it_refuses_a_duplicate_plan_name(lab, operator):
    members = [
        {
            "replica_id": r.pk,
            "vm_name": f"{r.source_name}-prod",
            "target_host": "esx-prod-01",
            "target_datastore": "prod-ds-01",
            "network_map": network_map(r),
        }
        for r in (replica_named("web-01"), replica_named("app-crm"))
    ]
    plans.start_plan(operator, name="wave", members=members[:1])
    before = db_state()
    with pytest.raises(workflow.Refused, match="A plan named 'wave' already exists; pick another name."):
        plans.start_plan(operator, name="wave", members=members[1:])
    assert db_state() == before and refusals("start_plan")


@pytest.mark.django_db(databases="__all__")
def test_it_frees_the_name_of_a_plan_that_could_not_start(lab, operator):
    """A refused plan keeps its withdrawn members on the record, but the corrected attempt may use the same name."""
    busy = start(operator, replica_named("app-crm"))
    members = [
        {
            "replica_id": r.pk,
            "vm_name": f"{r.source_name}-wave",
            "target_host": "esx-prod-01",
            "target_datastore": "prod-ds-01",
            "network_map": network_map(r),
        }
        for r in (replica_named("web-01"), replica_named("app-crm"))
    ]  # names free: the replica is busy
    with pytest.raises(workflow.Refused, match=f"Plan wave not started: .*already has failback #{busy.pk}"):
        plans.start_plan(operator, name="wave", members=members)
    assert set(FailbackSession.objects.exclude(pk=busy.pk).values_list("status", flat=True)) == {
        SessionStatus.CANCELLED
    }
    assert Replica.objects.get(pk=members[0]["replica_id"]).state == ReplicaState.FAILOVER
    assert plans.start_plan(operator, name="wave", members=members[:1]).name == "wave"


@pytest.mark.django_db(databases="__all__")
def test_it_refuses_a_duplicate_connection_name(lab, admin_user):
    connections.save_connection(
        admin_user, VCenterConnection(name="vc-1", host="vc1.example.test", username="svc"), password="pw-1"
    )
    before = db_state()
    response = logged_in(admin_user).post(
        reverse("failback:connection_new"),
        {
            "name": "vc-1",
            "host": "vc2.example.test",
            "port": 443,
            "username": "svc",
            "password": "pw-2",
            "tls_mode": "ca",
            "transport": "direct",
            "replica_suffix": "_replica",
            "sync_minutes": 15,
        },
    )
    assert response.status_code == 400 and "connection with this Name already exists" in response.content.decode()
    assert db_state() == before


@pytest.mark.django_db(databases="__all__")
def test_it_refuses_forged_ids_with_a_clear_message(lab, operator):
    """Ids of objects that do not exist, or that are not in a state the action accepts: refused, audited, nothing changed."""
    client = logged_in(operator)
    busy = start(operator, replica_named("app-crm"))
    Replica.objects.filter(pk=replica_named("web-01").pk).update(state=ReplicaState.READY)
    before = db_state()
    assert client.post(reverse("failback:action", args=[999999, "commit"])).status_code == 404
    assert client.post(reverse("failback:plan_action", args=[999999, "commit"])).status_code == 404
    assert client.get(reverse("failback:start", args=[999999])).status_code == 404
    page = client.post(reverse("failback:declare_failover", args=[999999]), follow=True).content.decode()
    assert "Declare failover refused: there is no replica #999999." in page
    page = client.post(reverse("failback:plan_new"), {"replica": ["999998", "999999"]}, follow=True).content.decode()
    assert "Select one or more replicas in Failover" in page
    crm, web = replica_named("app-crm"), replica_named("web-01")
    page = client.post(
        reverse("failback:start", args=[crm.pk]), start_form(crm, vm_name="app-crm-01-again")
    ).content.decode()
    assert f"already has failback #{busy.pk}" in page  # a second failback of a replica that has one running
    page = client.post(reverse("failback:start", args=[web.pk]), start_form(web)).content.decode()
    assert "failback starts only from Failover" in page  # a replica not in Failover
    page = client.post(reverse("failback:action", args=[busy.pk, "commit"]), follow=True).content.decode()
    assert "Commit refused" in page  # a session id whose state does not allow it
    assert db_state() == before
    assert len(refusals("start_failback")) == 2 and refusals("declare_failover") and refusals("commit")


# -- vCenter passwords -------------------------------------------------------------------------

PASSWORD = "Vc-S3cret-pa55-7781"


@pytest.mark.django_db(databases="__all__")
def test_it_stores_vcenter_passwords_encrypted(db, admin_user, settings):
    response = logged_in(admin_user).post(
        reverse("failback:connection_new"),
        {
            "name": "vc-1",
            "host": "127.0.0.1",
            "port": closed_port(),
            "username": "administrator@vsphere.local",
            "password": PASSWORD,
            "tls_mode": "ca",
            "transport": "direct",
            "replica_suffix": "_replica",
            "sync_minutes": 15,
        },
    )
    assert response.status_code == 302
    stored = VCenterConnection.objects.values_list("password_encrypted", flat=True).get()
    assert PASSWORD not in stored and PASSWORD.encode().hex() not in stored
    assert Fernet(settings.FAILBACK_CREDENTIALS_KEYS[0]).decrypt(stored.encode()).decode() == PASSWORD
    assert decrypt(stored) == PASSWORD
    other = VCenterConnection(name="vc-2")
    other.set_password(PASSWORD)
    assert other.password_encrypted != stored  # a fresh IV each time: equal passwords do not show as equal


@pytest.mark.django_db(databases="__all__")
def test_it_never_shows_logs_audits_or_exports_the_vcenter_password(db, admin_user, caplog):
    client = logged_in(admin_user)
    fields = {
        "name": "vc-1",
        "host": "127.0.0.1",
        "port": closed_port(),
        "username": "administrator@vsphere.local",
        "tls_mode": "ca",
        "transport": "direct",
        "replica_suffix": "_replica",
        "sync_minutes": 15,
    }
    with caplog.at_level(logging.DEBUG):
        client.post(reverse("failback:connection_new"), {**fields, "password": PASSWORD})
        connection = VCenterConnection.objects.get()
        VCenterConnection.objects.filter(pk=connection.pk).update(
            inventory={"vms": [{"vm_id": "vm-9", "name": "x_replica", "host": "h"}]}
        )
        client.post(
            reverse("failback:connection_edit", args=[connection.pk]), {**fields, "host": "localhost", "password": ""}
        )  # keeps it
        for action, data in (
            ("test", {}),
            ("thumbprint", {}),
            ("sync", {}),
            ("pair", {"vm_id": "vm-9", "source_name": "x"}),
        ):
            client.post(reverse("failback:connection_action", args=[connection.pk, action]), data)
    assert decrypt(VCenterConnection.objects.get().password_encrypted) == PASSWORD  # a blank password kept the old one
    assert (
        "Failed" in VCenterConnection.objects.get().last_test_result
    )  # the test reached the (absent) vCenter and said so
    seen = [caplog.text, repr(VCenterConnection.objects.get())]
    for url in (
        reverse("failback:connections"),
        reverse("failback:connection", args=[connection.pk]),
        reverse("failback:connection_edit", args=[connection.pk]),
        reverse("failback:audit"),
    ):
        seen.append(client.get(url).content.decode())
    for fmt in ("csv", "json"):
        seen.append(b"".join(client.get(reverse("failback:audit_export", args=[fmt])).streaming_content).decode())
    seen += [f"{e.detail} {json.dumps(e.data)}" for e in AuditEvent.objects.all()]
    assert (
        AuditEvent.objects.filter(
            action__in=["create_connection", "update_connection", "test_connection", "pair_replica"]
        ).count()
        >= 4
    )
    assert not [text[:200] for text in seen if PASSWORD in text]
    form = seen[4]
    assert (
        re.search(r'<input type="password" name="password"[^>]*>', form)
        and 'value="' not in re.search(r'<input type="password"[^>]*>', form).group()
    )


def settings_of(tmp_path, **env):
    """Start Django in a fresh process with only these secrets in the environment, and report what it took."""
    probe = (
        "import django, json, os; django.setup(); from django.conf import settings as s; "
        "print(json.dumps({'secret_key': s.SECRET_KEY, 'credentials_keys': s.FAILBACK_CREDENTIALS_KEYS}))"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SECRET_KEY", "FAILBACK_CREDENTIALS_KEYS")}
    return subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "DJANGO_SETTINGS_MODULE": "dr_portal.settings", "DR_PORTAL_VAR": str(tmp_path), **env},
    )


def test_it_takes_secrets_from_the_environment(tmp_path):
    key, fernet = "k" * 60, Fernet.generate_key().decode()
    result = settings_of(
        tmp_path, DJANGO_SECRET_KEY=key, FAILBACK_CREDENTIALS_KEYS=f"{fernet}, {Fernet.generate_key().decode()}"
    )
    assert result.returncode == 0, result.stderr
    taken = json.loads(result.stdout.splitlines()[-1])
    assert taken["secret_key"] == key and taken["credentials_keys"][0] == fernet and len(taken["credentials_keys"]) == 2
    assert (
        not (tmp_path / "secret_key").exists() and not (tmp_path / "credentials_key").exists()
    )  # nothing written to disk


def test_it_keeps_generated_dev_secrets_readable_by_the_owner_only(tmp_path):
    result = settings_of(tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("secret_key", "credentials_key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert json.loads(result.stdout.splitlines()[-1])["secret_key"] == (tmp_path / "secret_key").read_text().strip()


def test_it_refuses_to_start_with_a_malformed_credentials_key(tmp_path):
    result = settings_of(tmp_path, FAILBACK_CREDENTIALS_KEYS="not-a-fernet-key")
    assert result.returncode != 0 and "FAILBACK_CREDENTIALS_KEYS must be comma-separated Fernet keys" in result.stderr
    assert "not-a-fernet-key" not in result.stderr  # the message names the variable, not its value
    assert django_settings.FAILBACK_CREDENTIALS_KEYS  # (this process is untouched)
