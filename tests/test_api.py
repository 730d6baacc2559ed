"""The /api/v1/ automation API: every endpoint for every role, the pages' filters and paging, tokens, and
whole failbacks (one replica, then a plan) driven through the API alone on the real lab.

Role cases run in a rolled-back transaction (queued steps do not run); the whole failbacks commit, so
django-q2 runs the steps inline as in the other flow tests.
"""

import filecmp
import json
import os
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from failback import plans, tokens
from failback.choices import CommitPolicy, Outcome, ReplicaState, SessionStatus
from failback.hypervisors.lab import LabHypervisor
from failback.models import ApiToken, AuditEvent, FailbackSession, Replica

from .conftest import make_user, wait_for
from .helpers import network_map, put_session_in, start

pytestmark = pytest.mark.api

API = "/api/v1"


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    """The role cases create three users each; Django's test-speed hasher keeps that from dominating the run."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def bearer(token):
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


class Api:
    """A client that speaks JSON with a bearer token (and nothing else: no cookie, no CSRF token)."""

    def __init__(self, token=None):
        self.client = Client()
        self.headers = bearer(token) if token else {}

    def get(self, path, **params):
        return self.client.get(API + path, params, **self.headers)

    def post(self, path, body=None):
        return self.client.post(
            API + path, json.dumps({} if body is None else body), content_type="application/json", **self.headers
        )

    def patch(self, path, body=None):
        return self.client.patch(
            API + path, json.dumps({} if body is None else body), content_type="application/json", **self.headers
        )


def token_for(user, name="tests"):
    return tokens.issue(user, user, name)[1]


@pytest.fixture
def tiny_lab(db, settings):
    """Six replicas in Failover on a very small lab: for cases where data does not matter, only states."""
    call_command("seed_lab", "--count", "6", "--scale", "0.002", "--no-user", stdout=open(os.devnull, "w"))
    return LabHypervisor(settings.LAB_ROOT)


@pytest.fixture
def world(tiny_lab, operator):
    """One replica free to fail back, sessions in the states each action needs, and a plan."""
    free, queued, ready, failback, policy, planned = Replica.objects.order_by("name")
    in_failback = put_session_in(start(operator, failback), SessionStatus.FAILBACK)
    counting = put_session_in(start(operator, policy), SessionStatus.FAILBACK)
    FailbackSession.objects.filter(pk=counting.pk).update(
        commit_policy=CommitPolicy.AUTO_COMMIT,
        commit_after_min=30,
        policy_due_at=timezone.now() + timedelta(minutes=30),
    )
    plan = plans.start_plan(
        operator,
        name="wave-1",
        members=[
            {
                "replica_id": planned.pk,
                "vm_name": f"{planned.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(planned),
            }
        ],
    )
    return {
        "free": free.pk,
        "queued": start(operator, queued).pk,
        "ready": put_session_in(start(operator, ready), SessionStatus.READY_TO_SWITCH).pk,
        "failback": in_failback.pk,
        "policy": counting.pk,
        "plan": plan.pk,
        "start_body": start_body(free),
        "plan_body": {"name": "wave-2", "members": [{**start_body(free), "replica_id": free.pk}]},
    }


def start_body(replica, **overrides):
    return {
        "vm_name": f"{replica.source_name}-prod",
        "target_host": "esx-prod-01",
        "target_datastore": "prod-ds-01",
        "network_map": network_map(replica),
        "switch_mode": "manual",
        **overrides,
    }


def in_an_hour():
    return (timezone.now() + timedelta(hours=1)).isoformat()


NIGHTS = {"kind": "weekly", "days": ["sat", "sun"], "start": "02:00", "end": "04:00", "tz": "Europe/Paris"}
# (name, method, path, body, status for an Operator, the audit action a call writes)
ENDPOINTS = [
    ("list replicas", "get", "/replicas", None, 200, None),
    ("get replica", "get", "/replicas/{free}", None, 200, None),
    ("replica targets", "get", "/replicas/{free}/targets", None, 200, None),
    ("list sessions", "get", "/sessions", None, 200, None),
    ("get session", "get", "/sessions/{ready}", None, 200, None),
    ("list plans", "get", "/plans", None, 200, None),
    ("get plan", "get", "/plans/{plan}", None, 200, None),
    ("audit", "get", "/audit", None, 200, None),
    ("start failback", "post", "/replicas/{free}/failback", "start_body", 201, "start_failback"),
    ("switch now", "post", "/sessions/{ready}/switch", {"reason": "CHG-1"}, 200, "switch"),
    ("schedule switch", "post", "/sessions/{queued}/schedule", {"switch_at": in_an_hour}, 200, "schedule_switch"),
    (
        "set windows",
        "post",
        "/sessions/{queued}/windows",
        {"windows": [NIGHTS], "downtime_budget_s": 120},
        200,
        "set_switch_windows",
    ),
    ("cancel", "post", "/sessions/{queued}/cancel", {"reason": "wrong host"}, 200, "cancel"),
    ("stop commit policy", "post", "/sessions/{policy}/stop-commit-policy", {}, 200, "stop_commit_policy"),
    ("commit", "post", "/sessions/{failback}/commit", {"reason": "app team OK"}, 200, "commit"),
    ("undo", "post", "/sessions/{failback}/undo", {}, 200, "undo"),
    ("start plan", "post", "/plans", "plan_body", 201, "start_plan"),
    ("plan switch", "post", "/plans/{plan}/switch", {}, 409, "switch_plan"),  # its member is still queued
    ("plan schedule", "post", "/plans/{plan}/schedule", {"switch_at": in_an_hour}, 200, "schedule_plan_switch"),
    (
        "plan windows",
        "post",
        "/plans/{plan}/windows",
        {"windows": [NIGHTS], "downtime_budget_s": 300},
        200,
        "set_switch_windows",
    ),
    ("plan commit", "post", "/plans/{plan}/commit", {}, 409, "commit_plan"),  # no member in Failback
    ("plan undo", "post", "/plans/{plan}/undo", {}, 409, "undo_plan"),
]
ROLES = ["anonymous", "bad token", "revoked token", "viewer", "operator", "administrator"]


def call(api, endpoint, world):
    _, method, path, body, _, _ = endpoint
    path = (
        path.format(**world)
        if world
        else path.format_map({k: 1 for k in ("free", "ready", "queued", "policy", "failback", "plan")})
    )
    if isinstance(body, str):
        body = world[body] if world else {}
    elif isinstance(body, dict):
        body = {k: v() if callable(v) else v for k, v in body.items()}
    return api.get(path) if method == "get" else api.post(path, body)


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_it_gives_each_role_what_the_ui_gives_it(request, role, endpoint):
    name, method, _, _, operator_status, action = endpoint
    if role in ("anonymous", "bad token", "revoked token"):
        user = make_user("rita", "Operator")
        token = None if role == "anonymous" else token_for(user)
        if role == "bad token":
            token = token[:-1] + ("x" if token[-1] != "x" else "y")
        if role == "revoked token":
            tokens.revoke(user, ApiToken.objects.get(user=user).pk)
        before = AuditEvent.objects.count()
        response = call(Api(token), endpoint, None)
        assert response.status_code == 401, response.content
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert "API token" in response.json()["detail"]
        assert AuditEvent.objects.count() == before  # nothing was attempted on anybody's behalf
        return
    world = request.getfixturevalue("world")
    user = {"viewer": "viewer", "operator": "operator", "administrator": "admin_user"}[role]
    user = request.getfixturevalue(user)
    before = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first()
    response = call(Api(token_for(user)), endpoint, world)
    body = response.json()
    written = AuditEvent.objects.filter(id__gt=before, action=action or "-", actor=user) if action else None
    if method == "get":
        assert response.status_code == 200, body
        return
    if role == "viewer":
        assert response.status_code == 403, body
        assert body["detail"].startswith("victor may not") and "the Operator role is needed" in body["detail"]
        assert written.get().outcome == Outcome.REFUSED
        return
    assert response.status_code == operator_status, body
    if operator_status >= 400:
        assert body["detail"] and written.get().outcome == Outcome.REFUSED and written.get().detail == body["detail"]
    else:
        assert body["id"] and written.filter(outcome=Outcome.OK).exists(), f"{name}: no OK audit row by {user}"


@pytest.mark.django_db
def test_it_ignores_the_session_cookie(operator):
    client = Client()
    client.force_login(operator)
    assert client.get("/").status_code == 200  # the page works with the cookie...
    response = client.get(f"{API}/replicas")
    assert response.status_code == 401  # ...the API does not accept it: tokens only, so no CSRF exposure
    response = client.post(f"{API}/plans", "{}", content_type="application/json")
    assert response.status_code == 401


@pytest.mark.django_db
def test_it_refuses_an_illegal_action_with_409_and_audits_it(world, operator):
    api = Api(token_for(operator))
    response = api.post(f"/sessions/{world['ready']}/commit", {"reason": "too early"})
    assert response.status_code == 409
    message = f"Commit refused: failback #{world['ready']} has not switched yet (Ready to switch); commit is possible only in Failback."
    assert response.json() == {"detail": message}
    refusal = AuditEvent.objects.get(action="commit", session_id=world["ready"])
    assert (refusal.outcome, refusal.actor, refusal.detail) == (Outcome.REFUSED, operator, message)
    # A second failback on a replica that already has one, and a plan member switched on its own: refused by the service.
    busy = FailbackSession.objects.get(pk=world["queued"]).replica
    response = api.post(f"/replicas/{busy.pk}/failback", start_body(busy, vm_name="another-name"))
    assert response.status_code == 409 and f"already has failback #{world['queued']}" in response.json()["detail"]
    # Found by schemathesis: a VM folder on the lab (no folders there) was a 500; it is a refusal now.
    response = api.post(
        f"/replicas/{world['free']}/failback", start_body(Replica.objects.get(pk=world["free"]), folder="group-v1")
    )
    assert response.status_code == 409 and "has no resource pools or VM folders" in response.json()["detail"]
    member = FailbackSession.objects.get(plan_id=world["plan"])
    response = api.post(f"/sessions/{member.pk}/switch", {})
    assert response.status_code == 409 and "belongs to plan wave-1" in response.json()["detail"]


@pytest.mark.django_db
def test_it_answers_404_and_422_in_json(world, operator):
    api = Api(token_for(operator))
    for path in ("/sessions/999999", "/replicas/999999", "/plans/999999", "/replicas/999999/targets"):
        response = api.get(path)
        assert response.status_code == 404 and response.json()["detail"].startswith("There is no ")
    assert api.post("/sessions/999999/commit", {}).status_code == 404
    response = api.post(f"/sessions/{world['queued']}/schedule", {"switch_at": "2030-01-01T10:00:00"})  # no time zone
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "switch_at"
    response = api.post(f"/replicas/{world['free']}/failback", {"vm_name": "x"})
    assert response.status_code == 422 and {e["loc"][-1] for e in response.json()["detail"]} >= {
        "target_host",
        "target_datastore",
    }
    assert api.get("/replicas", limit=501).status_code == 422
    assert api.get("/sessions/0").status_code == 422
    assert api.get("/audit", outcome="maybe").status_code == 422
    response = api.get("/audit", since="2026-02-01", until="2026-01-01")
    assert (
        response.status_code == 422 and "The start date is after the end date." in response.json()["detail"][0]["msg"]
    )
    response = api.post(
        f"/sessions/{world['queued']}/schedule", {"switch_at": (timezone.now() - timedelta(hours=1)).isoformat()}
    )
    assert (
        response.status_code == 409 and "is in the past" in response.json()["detail"]
    )  # the service's rule, not a copy


@pytest.mark.django_db
def test_it_filters_and_pages_like_the_pages(world, viewer, operator):
    api = Api(token_for(viewer))
    everything = api.get("/replicas").json()
    assert everything["count"] == 6 and [r["name"] for r in everything["items"]] == sorted(
        r["name"] for r in everything["items"]
    )
    failover = api.get("/replicas", state=ReplicaState.FAILOVER).json()
    assert failover["count"] == 6 - 3 and {r["state"] for r in failover["items"]} == {"failover"}
    first, second = api.get("/replicas", limit=4, offset=0).json(), api.get("/replicas", limit=4, offset=4).json()
    assert (first["count"], len(first["items"]), len(second["items"])) == (6, 4, 2)
    assert [r["id"] for r in first["items"] + second["items"]] == [r["id"] for r in everything["items"]]
    assert [r["name"] for r in api.get("/replicas", sort="-name").json()["items"]] == sorted(
        (r["name"] for r in everything["items"]), reverse=True
    )
    crm = api.get("/replicas", q="crm").json()
    assert crm["count"] == 1 and "crm" in crm["items"][0]["name"] and crm["items"][0]["power"] == "poweredOn"
    assert api.get("/replicas", limit=4, offset=100).json() == {"count": 6, "limit": 4, "offset": 100, "items": []}

    sessions = api.get("/sessions").json()
    assert sessions["count"] == 5 and [s["id"] for s in sessions["items"]] == sorted(
        (s["id"] for s in sessions["items"]), reverse=True
    )
    in_failback = api.get("/sessions", status="failback").json()
    assert {s["id"] for s in in_failback["items"]} == {world["failback"], world["policy"]}
    assert all(s["allowed_actions"] == ["commit", "undo"] for s in in_failback["items"] if s["id"] == world["failback"])
    assert [s["id"] for s in api.get("/sessions", plan=world["plan"]).json()["items"]] == [
        FailbackSession.objects.get(plan_id=world["plan"]).pk
    ]
    ready = api.get(f"/sessions/{world['ready']}").json()
    assert (
        ready["status"] == "ready_to_switch"
        and ready["allowed_actions"] == ["switch", "schedule", "windows", "cancel"]
        and ready["started_by"] == "olivia"
    )

    Api(token_for(operator)).post(f"/sessions/{world['ready']}/commit", {})  # a refusal, for the filters below
    refused = api.get("/audit", outcome="refused", user="olivia").json()
    assert (
        refused["count"] == 1
        and refused["items"][0]["action"] == "commit"
        and refused["items"][0]["session"] == world["ready"]
    )
    starts = api.get("/audit", action="start_failback", limit=2).json()
    assert starts["count"] == 5 and len(starts["items"]) == 2 and all(e["actor"] == "olivia" for e in starts["items"])
    assert api.get("/audit", session=world["ready"], q="CHG-none").json()["count"] == 0
    today = timezone.localdate().isoformat()
    assert api.get("/audit", since=today, until=today).json()["count"] == AuditEvent.objects.count()


@pytest.mark.django_db
def test_it_shows_where_a_replica_can_go(world, viewer):
    targets = Api(token_for(viewer)).get(f"/replicas/{world['free']}/targets").json()
    assert "esx-prod-01" in targets["hosts"] and "prod-ds-01" in {d["name"] for d in targets["datastores"]}
    assert targets["suggested_network_map"] == network_map(Replica.objects.get(pk=world["free"]))


@pytest.mark.django_db
def test_it_serves_its_openapi_schema_and_docs_without_a_cdn(client):
    schema = client.get(f"{API}/schema/").json()
    assert schema["info"]["version"] == "1" and schema["components"]["securitySchemes"]["BearerToken"] == {
        "type": "http",
        "scheme": "bearer",
    }
    assert {
        "/api/v1/replicas",
        "/api/v1/sessions/{session_id}/switch",
        "/api/v1/plans/{plan_id}/commit",
        "/api/v1/audit",
    } <= set(schema["paths"])
    assert schema["paths"]["/api/v1/sessions/{session_id}/commit"]["post"]["operationId"] == "commit"
    docs = client.get(f"{API}/docs").content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in docs and "cdn" not in docs


# -- tokens --------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_a_token_with_the_command_and_stores_only_its_hash(world, operator):
    out, err = StringIO(), StringIO()
    call_command("create_api_token", "olivia", "--name", "nightly failback drill", stdout=out, stderr=err)
    token = out.getvalue().strip()
    assert token.startswith("drp_") and "shown once" in err.getvalue()
    row = ApiToken.objects.get(user=operator)
    assert token.startswith(row.prefix) and row.key_hash == tokens.digest(token)
    assert token not in json.dumps(list(ApiToken.objects.values()), default=str)
    created = AuditEvent.objects.get(action="api_token_created")
    assert created.data["prefix"] == row.prefix and token not in created.detail + json.dumps(created.data)
    assert Api(token).get("/replicas").status_code == 200
    assert ApiToken.objects.get(pk=row.pk).last_used_at is not None
    with pytest.raises(Exception, match="no active user"):
        call_command("create_api_token", "nobody", stdout=out, stderr=err)


@pytest.mark.django_db
def test_it_lets_a_user_create_see_once_and_revoke_their_tokens_on_the_page(viewer, operator):
    page = Client()
    page.force_login(viewer)
    assert 'href="/account/tokens/"' in page.get("/").content.decode()  # linked from the user menu
    response = page.post("/account/tokens/", {"name": "grafana"})
    html = response.content.decode()
    token = next(word for word in html.replace('"', " ").split() if word.startswith("drp_") and "_" in word[4:])
    assert "will not be shown again" in html and "no-store" in response["Cache-Control"]
    assert token not in page.get("/account/tokens/").content.decode()  # shown once
    assert Api(token).get("/sessions").status_code == 200
    assert Api(token).post("/plans", {"name": "x", "members": []}).status_code == 422  # a Viewer's token is a Viewer
    row = ApiToken.objects.get(user=viewer)
    other = ApiToken.objects.get(pk=tokens.issue(operator, operator, "someone else's")[0].pk)
    page.post(f"/account/tokens/{other.pk}/revoke/")
    assert ApiToken.objects.get(pk=other.pk).revoked_at is None  # not one of victor's
    page.post(f"/account/tokens/{row.pk}/revoke/")
    assert Api(token).get("/sessions").status_code == 401
    actions = list(
        AuditEvent.objects.filter(action__startswith="api_token").values_list("action", "outcome", "actor__username")
    )
    assert actions == [
        ("api_token_created", "ok", "victor"),
        ("api_token_created", "ok", "olivia"),
        ("api_token_revoked", "refused", "victor"),
        ("api_token_revoked", "ok", "victor"),
    ]
    assert not AuditEvent.objects.filter(detail__contains=token).exists()


# -- whole failbacks through the API alone -------------------------------------------------------------


def wait_status(api, path, status, timeout=60):
    return wait_for(
        lambda: (lambda s: s if s["status"] == status else None)(api.get(path).json()),
        timeout=timeout,
        what=f"{path} {status}",
    )


def assert_disks_identical(lab, session_id):
    session = FailbackSession.objects.select_related("replica").get(pk=session_id)
    for disk in session.disks.all():
        assert filecmp.cmp(
            lab.disk_path(session.replica.vm_id, disk.key),
            lab.disk_path(session.production_vm_id, disk.key),
            shallow=False,
        )
        assert disk.verified and disk.source_digest == disk.target_digest != ""


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_it_fails_back_a_replica_through_the_api_alone(lab, operator):
    api = Api(token_for(operator))
    found = api.get("/replicas", q="app-erp", state="failover").json()["items"]
    assert len(found) == 1
    replica = found[0]
    targets = api.get(f"/replicas/{replica['id']}/targets").json()
    host = next(h for h in targets["hosts"] if h.startswith("esx-prod"))
    body = {
        "vm_name": "erp-prod",
        "target_host": host,
        "target_datastore": "prod-ds-02",
        "network_map": targets["suggested_network_map"],
        "switch_mode": "manual",
        "reason": "CHG-100",
    }
    created = api.post(f"/replicas/{replica['id']}/failback", body)
    assert created.status_code == 201, created.content
    path = f"/sessions/{created.json()['id']}"
    ready = wait_status(api, path, "ready_to_switch")
    assert (
        api.get(f"/replicas/{replica['id']}").json()["state"] == "ready_to_switch"
        and ready["allowed_actions"][0] == "switch"
    )
    for disk in ready["disks"]:  # users keep working on the replica until the switch
        lab.guest_write(replica["vm_id"], disk["key"], disk["capacity_bytes"] // 2, b"\xa5" * 65536)
    assert api.post(f"{path}/switch", {"reason": "CHG-100 window"}).status_code == 200
    done = wait_status(api, path, "failback")
    assert done["switch_window_s"] is not None and all(d["verified"] for d in done["disks"])
    assert_disks_identical(lab, done["id"])
    assert api.post(f"{path}/commit", {"reason": "app team confirmed"}).status_code == 200
    wait_status(api, path, "committed")
    assert api.get(f"/replicas/{replica['id']}").json()["state"] == "ready"
    trail = api.get("/audit", session=done["id"], user="olivia", limit=500).json()["items"]
    assert [e["action"] for e in reversed(trail)] == ["start_failback", "switch", "commit"]


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_it_fails_back_a_plan_through_the_api_alone(lab, operator):
    api = Api(token_for(operator))
    members, names = [], []
    for name in ("web-01", "app-crm"):
        replica = api.get("/replicas", q=name).json()["items"][0]
        targets = api.get(f"/replicas/{replica['id']}/targets").json()
        names.append(replica["name"])
        members.append(
            {
                "replica_id": replica["id"],
                "vm_name": f"{name}-prod",
                "target_host": "esx-prod-02",
                "target_datastore": "prod-ds-01",
                "network_map": targets["suggested_network_map"],
            }
        )
    created = api.post(
        "/plans", {"name": "wave-api", "members": members, "concurrency": 1, "power_on_delay_s": 0, "reason": "DR test"}
    )
    assert created.status_code == 201, created.content
    path = f"/plans/{created.json()['id']}"
    wait_for(
        lambda: all(m["status"] == "ready_to_switch" for m in api.get(path).json()["members"]),
        what="every member Ready to switch",
    )
    assert api.post(f"{path}/switch", {"reason": "window"}).status_code == 200
    wait_for(
        lambda: all(m["status"] == "failback" for m in api.get(path).json()["members"]), what="every member in Failback"
    )
    plan = api.get(path).json()
    assert [m["replica_name"] for m in plan["members"]] == names and plan["percent"] == 100
    for member in plan["members"]:
        assert_disks_identical(lab, member["session_id"])
    assert api.post(f"{path}/commit", {}).status_code == 200
    wait_for(
        lambda: all(m["status"] == "committed" for m in api.get(path).json()["members"]), what="every member committed"
    )
    assert (
        api.post(f"{path}/commit", {}).json()["detail"] == "Commit refused: no member of plan wave-api is in Failback."
    )
