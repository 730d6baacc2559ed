"""Refused API actions are on the record, as the pages' refusals are; bad bodies get JSON, never an HTML page.

Found from outside: input the schema rejected (an 81-character vm_name, a NUL in a name, bandwidth_mbps -1,
a 501-character reason) was a 422 with no audit row, while the same input through a page is audited; a body
over Django's size limit was an HTML 400 page with a traceback in the log; `true` passed as a number.
"""

import json
import logging

import pytest
from django.test import Client

from failback.choices import Outcome
from failback.models import ApiToken, AuditEvent

from .test_api import API, ENDPOINTS, Api, call, start_body, tiny_lab, token_for, world  # noqa: F401 (fixtures)

pytestmark = pytest.mark.api

ACTIONS = [e for e in ENDPOINTS if e[1] == "post"]
TOO_LONG = "r" * 501


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def last_id():
    return AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


def assert_one_refusal(since, action, user, token_name="tests"):
    """Exactly one row since ``since``: refused, under the action's name, by the token's user, saying it came through the API."""
    rows = list(AuditEvent.objects.filter(id__gt=since))
    assert [(r.action, r.outcome, r.actor_id) for r in rows] == [(action, Outcome.REFUSED, user.pk)], [
        (r.action, r.detail) for r in rows
    ]
    token = ApiToken.objects.get(user=user, name=token_name)
    assert rows[0].data["via"] == "api" and rows[0].data["api_token"] == {
        "id": token.pk,
        "name": token_name,
        "prefix": token.prefix,
    }
    return rows[0]


def with_body(endpoint, world, body):
    name, method, path, _, status, action = endpoint
    return (name, method, path, body, status, action)


@pytest.mark.django_db
def test_it_audits_every_action_refused_by_validation(world, operator):
    api = Api(token_for(operator))
    for endpoint in ACTIONS:
        name, _, _, body, _, action = endpoint
        body = world[body] if isinstance(body, str) else {k: v() if callable(v) else v for k, v in body.items()}
        body = {**body, "reason": TOO_LONG}  # every action takes a reason; otherwise the body is one the action accepts
        since = last_id()
        response = call(api, with_body(endpoint, world, body), world)
        assert response.status_code == 422, (name, response.content)
        row = assert_one_refusal(since, action, operator)
        assert "reason: String should have at most 500 characters" in row.detail, (name, row.detail)
        assert row.data["errors"][0]["loc"] == "reason"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vm_name", "v" * 81, "vm_name: String should have at most 80 characters"),
        ("vm_name", "app\x00-prod", "vm_name: String should match pattern"),
        ("bandwidth_mbps", -1, "bandwidth_mbps: Input should be greater than or equal to 1"),
        ("bandwidth_mbps", True, "bandwidth_mbps: Input should be a valid integer"),  # a boolean is not a number
        ("bandwidth_mbps", "100", "bandwidth_mbps: Input should be a valid integer"),  # nor is a string
        ("commit_after_min", 1.5, "commit_after_min: Input should be a valid integer"),
        ("power_on_after", 0, "power_on_after: Input should be a valid boolean"),  # nor a number a boolean
    ],
)
def test_it_audits_a_start_refused_by_validation(world, operator, field, value, message):
    api = Api(token_for(operator))
    since = last_id()
    response = api.post(f"/replicas/{world['free']}/failback", {**world["start_body"], field: value})
    assert response.status_code == 422
    row = assert_one_refusal(since, "start_failback", operator)
    assert (
        row.replica_id == world["free"]
        and row.detail.startswith("Start failback refused: invalid input (")
        and message in row.detail
    )
    assert "\x00" not in json.dumps(row.data)  # what was sent is not recorded (PostgreSQL could not store a NUL anyway)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body, message",
    [
        ({"name": "wave\x00"}, "name: String should match pattern"),
        ({"concurrency": True}, "concurrency: Input should be a valid integer"),
        ({"members": [{"replica_id": True}]}, "members.0.replica_id: Input should be a valid integer"),
    ],
)
def test_it_audits_a_plan_refused_by_validation(world, operator, body, message):
    api = Api(token_for(operator))
    since = last_id()
    plan = world["plan_body"]
    if "members" in body:
        body = {"members": [{**plan["members"][0], **body["members"][0]}]}
    response = api.post("/plans", {**plan, **body})
    assert response.status_code == 422
    assert message in assert_one_refusal(since, "start_plan", operator).detail


@pytest.mark.django_db
@pytest.mark.parametrize(
    "raw, message",
    [
        (b"not json", "The request body is not a JSON object"),
        (b"\xff\xfe\x00", "The request body is not a JSON object"),
        (b"[" * 100_000, "The request body is not a JSON object"),  # nested deeper than the parser goes
        (b"[]", "The request body is not a JSON object"),
        (b"null", "The request body is not a JSON object"),
        (b'{"reason": "' + b"x" * (3 * 2**20) + b'"}', "The request body is larger than"),
    ],
)
def test_it_answers_a_malformed_or_oversized_body_with_json_and_audits_it(world, operator, raw, message, caplog):
    token = token_for(operator)
    since = last_id()
    with caplog.at_level(logging.WARNING):
        response = Client().post(
            f"{API}/sessions/{world['failback']}/commit",
            raw,
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
    assert response.status_code in (400, 413) and response["Content-Type"].startswith("application/json")
    assert response.json()["detail"].startswith(message)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]  # no traceback in the log
    row = assert_one_refusal(since, "commit", operator)
    assert row.session_id == world["failback"] and row.detail.startswith("Commit refused: ")


@pytest.mark.django_db
def test_it_does_not_audit_reads_or_unauthenticated_calls(world, operator):
    since = last_id()
    assert (
        Api(token_for(operator)).get("/audit", until="9999-12-31").status_code == 422
    )  # a read: nothing was attempted
    assert (
        Api().post(f"/sessions/{world['failback']}/commit", {"reason": TOO_LONG}).status_code == 401
    )  # nobody to name
    assert list(AuditEvent.objects.filter(id__gt=since).exclude(action="api_token_created")) == []
