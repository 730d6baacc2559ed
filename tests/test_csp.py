"""The Content-Security-Policy: every page says it, it allows no inline script, inline style or eval, and the
pages carry nothing it would block (no inline <script>, no on*= handler, no style= attribute).
A real browser logging no violation while the pages work is in test_browser_csp.py.
"""

from html.parser import HTMLParser

import pytest
from django.test import Client

from .helpers import replica_named, start
from .security_support import empty_lab, fast_password_hashing  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.security


def policy(response):
    header = response.headers.get("Content-Security-Policy", "")
    return {d.split()[0]: d.split()[1:] for d in filter(None, (p.strip() for p in header.split(";")))}


def assert_strict(response):
    csp = policy(response)
    assert csp.get("script-src") == ["'self'"] and csp.get("style-src") == [
        "'self'"
    ], csp  # no 'unsafe-inline', no 'unsafe-eval'
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]


class Blocked(HTMLParser):
    """What the policy would block in a page: inline scripts, inline handlers, style attributes and elements."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and "src" not in attrs and attrs.get("type") != "application/json":
            self.found.append(("inline script", attrs))
        if tag == "style":
            self.found.append(("style element", attrs))
        self.found += [(name, value) for name, value in attrs.items() if name.startswith("on") or name == "style"]
        self.found += [
            (name, value) for name, value in attrs.items() if (value or "").strip().lower().startswith("javascript:")
        ]


def blocked(html):
    parser = Blocked()
    parser.feed(html)
    return parser.found


@pytest.mark.django_db
def test_every_page_has_the_policy_and_nothing_it_would_block(admin_user, operator):
    empty_lab()
    session = start(operator, replica_named("app-erp"))
    client = Client()
    client.force_login(admin_user)
    pages = [
        "/",
        "/replicas/",
        f"/replicas/{replica_named('db-sql').pk}/failback/",
        "/sessions/",
        f"/sessions/{session.pk}/",
        f"/sessions/{session.pk}/report/",
        "/plans/",
        f"/plans/new/?replica={replica_named('web-01').pk}",
        "/audit/",
        "/account/tokens/",
        "/connections/",
        "/connections/new/",
        "/api/v1/docs",
    ]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        assert_strict(response)
        assert blocked(response.content.decode()) == [], url
    created = client.post("/account/tokens/", {"name": "ci"})  # the page that shows a new token once
    assert created.status_code == 200 and blocked(created.content.decode()) == []
    fragment = client.post(
        f"/sessions/{session.pk}/cancel/", {"reason": "x"}, HTTP_HX_REQUEST="true"
    )  # an htmx partial
    assert fragment.status_code == 200 and blocked(fragment.content.decode()) == []
    assert_strict(fragment)


@pytest.mark.django_db
def test_the_login_page_and_errors_have_the_policy_too():
    client = Client()
    for url, status in (("/accounts/login/", 200), ("/no-such-page/", 404), ("/api/v1/replicas", 401)):
        response = client.get(url)
        assert response.status_code == status
        assert_strict(response)
    assert blocked(client.get("/accounts/login/").content.decode()) == []
