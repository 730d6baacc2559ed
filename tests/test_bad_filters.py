"""Bad filter input on the list pages, the audit exports and the API: a clear message (422 in the API), never a 500.

Found from outside: far dates overflowed Python's date arithmetic, a 20-digit session id overflowed SQLite's
integer, a 20-digit replica id overflowed the plan page, and a NUL in a replica filter broke PostgreSQL.
"""

import pytest
from django.test import Client

from failback import tokens

from .security_support import empty_lab, fast_password_hashing  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.security

HUGE = "99999999999999999999"  # more than 64 bits


@pytest.fixture
def client(db, viewer):
    client = Client(raise_request_exception=False)  # a 500 is an answer to assert on, not an exception in the test
    client.force_login(viewer)
    return client


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query, message",
    [
        ({"until": "9999-12-31"}, "Enter a date between 1970-01-01 and 9998-12-31."),
        ({"since": "0001-01-01"}, "Enter a date between 1970-01-01 and 9998-12-31."),
        ({"session": HUGE}, "Ensure this value is less than or equal to 2147483647."),
        ({"session": "1e3"}, "Enter a whole number."),
        ({"q": "a\x00b"}, "Null characters are not allowed."),
    ],
)
def test_it_says_why_an_audit_filter_is_refused(client, query, message):
    response = client.get("/audit/", query)
    assert response.status_code == 200 and message in response.content.decode()
    for fmt in ("csv", "json"):  # an export never silently ignores the filter it was given: it refuses and says why
        response = client.get(f"/audit/export.{fmt}", query)
        assert response.status_code == 400 and message in response.content.decode()


@pytest.mark.django_db
def test_it_still_filters_and_exports_by_date_within_the_range(client):
    widest = {"since": "1970-01-01", "until": "9998-12-31", "user": "victor"}
    assert "1 event" in client.get("/audit/", widest).content.decode()  # the client's login
    response = client.get("/audit/export.json", widest)
    assert response.status_code == 200 and b'"action": "login"' in b"".join(response.streaming_content)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query, message",
    [
        ({"until": "9999-12-31"}, "less than or equal to 9998-12-31"),
        ({"since": "0001-01-01"}, "greater than or equal to 1970-01-01"),
        ({"session": HUGE}, "less than or equal to 2147483647"),
    ],
)
def test_the_api_answers_a_bad_audit_filter_with_422(viewer, query, message):
    token = tokens.issue(viewer, viewer, "filters")[1]
    response = Client(raise_request_exception=False).get("/api/v1/audit", query, HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 422 and message in str(response.json()["detail"])


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url, query, message",
    [
        ("/sessions/", {"replica": HUGE}, "Replica #: Ensure this value is less than or equal to 2147483647."),
        ("/sessions/", {"plan": HUGE}, "Plan #: Ensure this value is less than or equal to 2147483647."),
        ("/sessions/", {"replica": "x"}, "Replica #: Enter a whole number."),
        ("/sessions/", {"status": "nonsense"}, "Status: Select a valid choice."),
        ("/replicas/", {"q": "a\x00b"}, "Search: Null characters are not allowed."),
        ("/replicas/", {"site": "\x00"}, "Site: Null characters are not allowed."),
        ("/replicas/", {"host": "\x00"}, "Host: Null characters are not allowed."),
        ("/replicas/", {"q": "x" * 201}, "Search: Ensure this value has at most 200 characters"),
    ],
)
def test_it_says_why_a_list_filter_is_refused(client, url, query, message):
    empty_lab()
    response = client.get(url, query)
    assert response.status_code == 200 and message in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("replica", [HUGE, "\u00b2"])  # beyond the database's integer; a digit that int() refuses
def test_the_plan_page_refuses_replica_ids_it_cannot_look_up(operator, replica):
    empty_lab()
    client = Client(raise_request_exception=False)
    client.force_login(operator)
    response = client.get("/plans/new/", {"replica": replica}, follow=True)
    assert response.status_code == 200 and "Select one or more replicas in Failover" in response.content.decode()
