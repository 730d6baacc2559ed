"""Schemathesis against a live Daphne: every operation of /api/v1/ is called with generated requests (valid
and invalid), with an Operator's token, and every answer must hold to the published OpenAPI schema.

The server is a real process on a free loopback port, on this test's database and lab (as in the browser
tests); no worker runs, so an accepted action only queues its step. Examples per operation are bounded
so the whole run stays well under a minute.
"""

from collections import Counter
from datetime import timedelta

import pytest
import requests
import schemathesis
from django.utils import timezone
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from failback import connections, plans, tokens
from failback.models import ApprovalRequest, VCenterConnection

from .browser_support import Portal, server_env
from .conftest import make_user
from .helpers import network_map, replica_named, start
from .security_support import closed_port

pytestmark = [pytest.mark.api, pytest.mark.django_db(databases="__all__", transaction=True)]

EXAMPLES = 5  # per operation and mode: 39 operations x 2 modes x 5 requests
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    ignored_auth,
]


@pytest.fixture
def live_api(lab, settings, tmp_path):
    """Daphne on the test database, with a session (Ready to switch) and a plan, so that generated requests also reach real
    rows and the service layer's rules, not only 404s."""
    operator = make_user("olivia", "Operator")
    ids = {"session_id": start(operator, replica_named("web-01")).pk, "replica_id": replica_named("app-erp").pk}
    # A vCenter connection that cannot be reached (saved unverified): the Operator's token meets the
    # Administrator's endpoints with 403, so generated hosts are never contacted.
    ids["connection_id"] = connections.save_connection(
        make_user("ada", "Administrator"),
        VCenterConnection(name="vc-lab", host="127.0.0.1", port=closed_port(), username="svc"),
        password="vc-Pa55word",
    ).pk
    ids["plan_id"] = plans.start_plan(
        operator,
        name="wave-1",
        members=[
            {
                "replica_id": replica_named("app-crm").pk,
                "vm_name": "crm-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(replica_named("app-crm")),
            }
        ],
    ).pk
    # A switch asked for by someone else and waiting for approval: approve and reject reach a real request.
    ids["request_id"] = ApprovalRequest.objects.create(
        session_id=ids["session_id"],
        action="switch",
        params={"reason": "schemathesis"},
        requested_by=make_user("rita", "Operator"),
        expires_at=timezone.now() + timedelta(hours=1),
    ).pk
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    server = Portal(env=server_env(settings), log_dir=log_dir)
    try:
        server.start_web()
        yield server.url, tokens.issue(operator, operator, "schemathesis")[1], ids
    finally:
        server.stop()
        print(server.logs()["daphne"])


def test_it_holds_to_its_schema_under_generated_requests(live_api):
    """Each operation, with valid then invalid data: no 5xx, only documented statuses, bodies as documented,
    invalid input refused, and no operation answering without the token. All failures are reported together."""
    url, token, ids = live_api
    # Unknown query parameters are ignored, as by most HTTP APIs: do not count them as invalid input.
    config = schemathesis.Config.from_dict({"generation": {"allow-extra-parameters": False}})
    schema = schemathesis.openapi.from_url(f"{url}/api/v1/schema/", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 39
    failures, seen = {}, Counter()
    http = requests.Session()
    http.hooks["response"].append(
        lambda response, *args, **kwargs: seen.update([(response.request.method, response.status_code)])
    )
    for operation in operations:
        existing = {p.name: ids[p.name] for p in operation.path_parameters}
        for mode, path_parameters in (
            (GenerationMode.POSITIVE, None),
            (GenerationMode.NEGATIVE, None),
            (GenerationMode.POSITIVE, existing),
        ):
            if path_parameters == {}:
                continue  # no id in the path: the first pass covered it

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
            def check(case):
                case.call_and_validate(
                    base_url=url, session=http, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS
                )

            try:
                check()
            except (Exception, BaseExceptionGroup) as exc:  # collected, then reported all at once
                failures[f"{operation.label} ({mode.value}{', existing ids' if path_parameters else ''})"] = exc
    print("requests by method and status:", dict(sorted(seen.items())))
    assert not failures, "\n\n".join(f"{label}: {exc}" for label, exc in failures.items())
    assert sum(seen.values()) >= len(operations) * 2 * EXAMPLES / 2  # the cases really went over the wire
    assert {status for _, status in seen} >= {200, 401, 404, 409, 422}


def test_it_publishes_a_schema_that_names_every_operation(live_api):
    url, _, _ = live_api
    published = requests.get(f"{url}/api/v1/schema/", timeout=10).json()
    operations = {(method.upper(), path) for path, item in published["paths"].items() for method in item}
    assert len(operations) == 39
    assert all(item[m].get("security") == [{"BearerToken": []}] for item in published["paths"].values() for m in item)
    assert requests.get(f"{url}/api/v1/replicas", timeout=10).status_code == 401
