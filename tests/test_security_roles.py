"""Who may do what: login on every page, CSRF on every POST, and the role matrix (anonymous, Viewer,
Operator, Administrator x every action), checked twice: through the UI (the page offers the control
or not) and by forged POSTs (refused, nothing changed, the refusal audited where the service layer
refuses).

The matrix is a table (ACTIONS): to cover a new action, add one row saying how to build its target,
which page offers it and who may use it. URL iteration (login, CSRF) picks up new pages by itself.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone

from failback import connections, plans, tokens
from failback.choices import CommitPolicy, Outcome, ReplicaState, SessionStatus, SwitchMode
from failback.models import (
    ApprovalRequest,
    ApprovalRule,
    AuditEvent,
    FailbackPlan,
    FailbackSession,
    Replica,
    VCenterConnection,
)

from .conftest import make_user
from .helpers import network_map, put_session_in, replica_named, start
from .security_support import closed_port, db_state, empty_lab, fast_password_hashing  # noqa: F401 (an autouse fixture)

pytestmark = [pytest.mark.security, pytest.mark.django_db(databases="__all__")]

ROLES = ("anonymous", "viewer", "operator", "admin")
OPERATORS = frozenset({"operator", "admin"})  # the Administrator group holds the Operator permission too
ADMINS = frozenset({"admin"})
EVERYONE = frozenset({"viewer", "operator", "admin"})


# -- helpers -----------------------------------------------------------------------------------


class Controls(HTMLParser):
    """Where a page lets its user go or post: links (GET) and forms (POST), as URL paths."""

    def __init__(self, page_path):
        super().__init__()
        self.page_path, self.links, self.posts, self.inputs = page_path, set(), set(), set()
        self.opens = set()  # GET forms: a button that opens a dialog (or its page without JavaScript)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.add(urlsplit(attrs["href"]).path)
        if tag == "form" and (attrs.get("method") or "get").lower() == "post":
            self.posts.add(urlsplit(attrs.get("action") or self.page_path).path)
        elif tag == "form" and attrs.get("action"):
            self.opens.add(urlsplit(attrs["action"]).path)
        if tag == "input" and attrs.get("name"):
            self.inputs.add(attrs["name"])


def controls(client, page):
    response = client.get(page)
    parser = Controls(urlsplit(page).path)
    if response.status_code == 200:
        parser.feed(response.content.decode())
    return response, parser


def in_an_hour():
    return (timezone.localtime() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")


# -- the targets each action needs -------------------------------------------------------------


@dataclass
class Target:
    url: str  # where the action posts
    page: str  # the page that offers it
    data: dict  # what the page's form would send
    done: Callable[[], bool]  # the action's effect, seen in the database


def session_in(status):
    return lambda world: put_session_in(start(world.operator, replica_named("app-crm")), status)


def session_action(action, status, data=dict, *, effect):
    def arrange(world):
        session = session_in(status)(world)
        return Target(
            reverse("failback:action", args=[session.pk, action]),
            reverse("failback:session", args=[session.pk]),
            data(),
            lambda: effect(FailbackSession.objects.get(pk=session.pk)),
        )

    return arrange


def countdown_target(world):
    session = session_in(SessionStatus.FAILBACK)(world)
    FailbackSession.objects.filter(pk=session.pk).update(
        commit_policy=CommitPolicy.AUTO_COMMIT,
        commit_after_min=30,
        policy_due_at=timezone.now() + timedelta(minutes=30),
    )
    return Target(
        reverse("failback:action", args=[session.pk, "stop_commit_policy"]),
        reverse("failback:session", args=[session.pk]),
        {},
        lambda: FailbackSession.objects.get(pk=session.pk).policy_stopped_at is not None,
    )


def start_target(world):
    replica = replica_named("web-01")
    nets = network_map(replica)
    data = {
        "vm_name": "web-01-prod",
        "target_host": "esx-prod-01",
        "target_datastore": "prod-ds-01",
        "switch_mode": SwitchMode.MANUAL,
        "commit_policy": CommitPolicy.NONE,
        "power_on_after": "on",
        **{f"net_nic{i}": target for i, target in enumerate(nets.values())},
    }
    return Target(
        reverse("failback:start", args=[replica.pk]),
        reverse("failback:replicas"),
        data,
        lambda: FailbackSession.objects.filter(replica=replica, status=SessionStatus.QUEUED).exists(),
    )


def override_target(world):
    """Start failback although a check failed (the replica is off): the Administrator's call, with a reason."""
    target = start_target(world)
    world.lab.power_off(replica_named("web-01").vm_id)
    target.data.update(override_checks="on", reason="replica off for maintenance; copy it anyway")
    target.page = target.url
    return target


def declare_target(world):
    replica = replica_named("db-sql-01")
    Replica.objects.filter(pk=replica.pk).update(state=ReplicaState.READY)
    return Target(
        reverse("failback:declare_failover", args=[replica.pk]),
        reverse("failback:replicas"),
        {"reason": "DR test"},
        lambda: Replica.objects.get(pk=replica.pk).state == ReplicaState.FAILOVER,
    )


def plan_new_target(world):
    replicas = [replica_named("web-01"), replica_named("app-crm")]
    data = {
        "replica": [r.pk for r in replicas],
        "name": "wave-1",
        "concurrency": 2,
        "switch_mode": SwitchMode.MANUAL,
        "power_on_delay_s": 0,
        "commit_policy": CommitPolicy.NONE,
    }
    for order, r in enumerate(replicas, 1):
        data.update(
            {
                f"m{r.pk}_order": order,
                f"m{r.pk}_vm_name": f"{r.source_name}-prod",
                f"m{r.pk}_host": "esx-prod-01",
                f"m{r.pk}_datastore": "prod-ds-01",
            }
        )
    url = reverse("failback:plan_new")
    return Target(
        url,
        f"{url}?replica={replicas[0].pk}&replica={replicas[1].pk}",
        data,
        lambda: FailbackPlan.objects.filter(name="wave-1").exists(),
    )


def plan_with_members(world, status):
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
    plan = plans.start_plan(world.operator, name="wave-0", members=members)
    for session in plan.sessions.all():
        put_session_in(session, status)
    return plan


def plan_action(action, status, data=dict, *, effect):
    def arrange(world):
        plan = plan_with_members(world, status)
        return Target(
            reverse("failback:plan_action", args=[plan.pk, action]),
            reverse("failback:plan", args=[plan.pk]),
            data(),
            lambda: effect(FailbackPlan.objects.get(pk=plan.pk)),
        )

    return arrange


def vcenter(world):
    connection = VCenterConnection(
        name="vc-lab", host="127.0.0.1", port=closed_port(), username="administrator@vsphere.local"
    )
    connection = connections.save_connection(world.admin, connection, password="vc-secret-Pa55")
    VCenterConnection.objects.filter(pk=connection.pk).update(
        inventory={"vms": [{"vm_id": "vm-42", "name": "orphan_replica", "host": "esx-dr-09"}]}
    )
    return connection


def connection_new_target(world):
    data = {
        "name": "vc-new",
        "host": "vc.example.test",
        "port": 443,
        "username": "svc",
        "password": "pw-123456",
        "tls_mode": "ca",
        "transport": "direct",
        "replica_suffix": "_replica",
        "sync_minutes": 15,
    }
    return Target(
        reverse("failback:connection_new"),
        reverse("failback:connections"),
        data,
        lambda: VCenterConnection.objects.filter(name="vc-new").exists(),
    )


def connection_edit_target(world):
    c = vcenter(world)
    data = {
        "name": c.name,
        "host": "vc2.example.test",
        "port": c.port,
        "username": c.username,
        "tls_mode": "ca",
        "transport": "direct",
        "replica_suffix": "_replica",
        "sync_minutes": 15,
    }
    return Target(
        reverse("failback:connection_edit", args=[c.pk]),
        reverse("failback:connection", args=[c.pk]),
        data,
        lambda: VCenterConnection.objects.get(pk=c.pk).host == "vc2.example.test",
    )


def connection_action(action, data=dict, *, effect):
    def arrange(world):
        c = vcenter(world)
        return Target(
            reverse("failback:connection_action", args=[c.pk, action]),
            reverse("failback:connection", args=[c.pk]),
            data(),
            lambda: effect(VCenterConnection.objects.get(pk=c.pk)),
        )

    return arrange


def approval_rule_target(world):
    return Target(
        reverse("failback:approval_rule"),
        reverse("failback:approvals"),
        {"action": "commit", "required": "yes"},
        lambda: ApprovalRule.objects.filter(action="commit", plan=None).exists(),
    )


def approve_target(world):
    """A commit asked for by a third person (so neither the operator nor the admin is its requester)."""
    session = session_in(SessionStatus.FAILBACK)(world)
    request = ApprovalRequest.objects.create(
        session=session,
        action="commit",
        params={"reason": "matrix"},
        requested_by=make_user("rita", "Operator"),
        expires_at=timezone.now() + timedelta(hours=1),
    )
    return Target(
        reverse("failback:approval_decide", args=[request.pk, "approve"]),
        reverse("failback:approvals"),
        {"reason": "ok"},
        lambda: ApprovalRequest.objects.get(pk=request.pk).status == ApprovalRequest.Status.DONE,
    )


def audited(action, outcome=None):
    """The action reached its service function (an audit row of that action, not a role refusal)."""
    rows = AuditEvent.objects.filter(action=action).exclude(detail__contains="role is needed")
    return rows.filter(outcome=outcome).exists() if outcome else rows.exists()


@dataclass(frozen=True)
class Action:
    id: str
    arrange: Callable  # world -> Target
    allowed: frozenset
    refusal: (
        str | None
    )  # the audit action of the service layer's refusal; None: refused by a permission check before it
    offered: str = "form"  # how the page offers it: a POST form, a link to the form's page, or "input:<name>" in a form

    def __str__(self):
        return self.id


ACTIONS = [
    Action("start failback", start_target, OPERATORS, "start_failback", offered="link"),
    Action("override failed checks", override_target, ADMINS, "start_failback", offered="input:override_checks"),
    Action(
        "switch now",
        session_action("switch", SessionStatus.READY_TO_SWITCH, effect=lambda s: s.status == SessionStatus.SWITCHING),
        OPERATORS,
        "switch",
    ),
    Action(
        "schedule switch",
        session_action(
            "schedule",
            SessionStatus.READY_TO_SWITCH,
            lambda: {"switch_at": in_an_hour()},
            effect=lambda s: s.switch_mode == SwitchMode.SCHEDULED,
        ),
        OPERATORS,
        "schedule_switch",
    ),
    Action(
        "maintenance windows",
        session_action(
            "windows",
            SessionStatus.READY_TO_SWITCH,
            lambda: {"windows": "daily 02:00-04:00 UTC", "downtime_budget_s": "120"},
            effect=lambda s: s.downtime_budget_s == 120 and s.switch_mode == SwitchMode.AUTO,
        ),
        OPERATORS,
        "set_switch_windows",
    ),
    Action(
        "commit",
        session_action("commit", SessionStatus.FAILBACK, effect=lambda s: s.status == SessionStatus.COMMITTING),
        OPERATORS,
        "commit",
    ),
    Action(
        "undo",
        session_action("undo", SessionStatus.FAILBACK, effect=lambda s: s.status == SessionStatus.UNDOING),
        OPERATORS,
        "undo",
    ),
    Action(
        "cancel",
        session_action("cancel", SessionStatus.QUEUED, effect=lambda s: s.status == SessionStatus.CANCELLED),
        OPERATORS,
        "cancel",
    ),
    Action("stop countdown", countdown_target, OPERATORS, "stop_commit_policy"),
    Action("declare failover", declare_target, OPERATORS, "declare_failover"),
    Action("start plan", plan_new_target, OPERATORS, "start_plan"),
    Action(
        "plan switch now",
        plan_action("switch", SessionStatus.READY_TO_SWITCH, effect=lambda p: p.switch_started_at is not None),
        OPERATORS,
        "switch_plan",
    ),
    Action(
        "plan schedule switch",
        plan_action(
            "schedule",
            SessionStatus.READY_TO_SWITCH,
            lambda: {"switch_at": in_an_hour()},
            effect=lambda p: p.switch_mode == SwitchMode.SCHEDULED,
        ),
        OPERATORS,
        "schedule_plan_switch",
    ),
    Action(
        "plan maintenance windows",
        plan_action(
            "windows",
            SessionStatus.READY_TO_SWITCH,
            lambda: {"windows": "weekly sat,sun 02:00-04:00 Europe/Paris", "downtime_budget_s": "300"},
            effect=lambda p: p.downtime_budget_s == 300 and p.switch_mode == SwitchMode.AUTO,
        ),
        OPERATORS,
        "set_switch_windows",
    ),
    Action(
        "plan commit",
        plan_action(
            "commit",
            SessionStatus.FAILBACK,
            effect=lambda p: {s.status for s in p.sessions.all()} == {SessionStatus.COMMITTING},
        ),
        OPERATORS,
        "commit_plan",
    ),
    Action(
        "plan undo",
        plan_action(
            "undo",
            SessionStatus.FAILBACK,
            effect=lambda p: {s.status for s in p.sessions.all()} == {SessionStatus.UNDOING},
        ),
        OPERATORS,
        "undo_plan",
    ),
    Action("require approval", approval_rule_target, ADMINS, "approval_rule"),
    Action("approve a request", approve_target, OPERATORS, "approve"),
    Action("create connection", connection_new_target, ADMINS, None, offered="link"),
    Action("edit connection", connection_edit_target, ADMINS, None, offered="link"),
    Action(
        "test connection",
        connection_action("test", effect=lambda c: c.last_test_at is not None and "Failed" in c.last_test_result),
        ADMINS,
        "test_connection",
    ),
    Action(
        "fetch thumbprint",
        connection_action("thumbprint", effect=lambda c: audited("fetch_thumbprint")),
        ADMINS,
        "fetch_thumbprint",
    ),
    Action(
        "sync inventory",
        connection_action("sync", effect=lambda c: audited("sync_inventory", Outcome.INFO)),
        ADMINS,
        "sync_inventory",
    ),
    Action(
        "pair replica",
        connection_action(
            "pair", lambda: {"vm_id": "vm-42", "source_name": "orphan"}, effect=lambda c: audited("pair_replica")
        ),
        ADMINS,
        "pair_replica",
    ),
]


class World:
    def __init__(self, lab, operator, viewer, admin_user):
        self.lab, self.operator, self.viewer, self.admin = lab, operator, viewer, admin_user

    def client(self, role, **kwargs):
        client = Client(**kwargs)
        if role != "anonymous":
            client.force_login(getattr(self, role))
        return client

    def user(self, role):
        return None if role == "anonymous" else getattr(self, role)


@pytest.fixture
def lab(db, settings):
    return empty_lab()


@pytest.fixture
def world(lab, operator, viewer, admin_user):
    return World(lab, operator, viewer, admin_user)


# -- the role matrix: forged requests ----------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", ACTIONS, ids=str)
def test_it_enforces_the_role_matrix_on_forged_posts(world, action, role):
    target = action.arrange(world)
    before = db_state()
    refusals_before = AuditEvent.objects.filter(outcome=Outcome.REFUSED).count()
    response = world.client(role).post(target.url, target.data)
    if role == "anonymous":
        assert response.status_code == 302 and response.url.startswith(reverse("login"))
        assert db_state() == before and AuditEvent.objects.filter(outcome=Outcome.REFUSED).count() == refusals_before
    elif role in action.allowed:
        assert response.status_code in (200, 302), response.content[:500]
        assert not AuditEvent.objects.filter(outcome=Outcome.REFUSED, detail__contains="role is needed").exists()
        assert target.done(), f"{action} by {role} had no effect"
    else:
        assert response.status_code in (302, 400, 403, 409)
        assert db_state() == before, f"{action} by {role} changed something"
        assert not target.done()
        if action.refusal:
            row = AuditEvent.objects.get(outcome=Outcome.REFUSED, action=action.refusal)
            assert row.actor == world.user(role) and "role is needed" in row.detail
            shown = world.client(role).post(target.url, target.data, follow=True).content.decode()
            assert "role is needed" in shown  # the person who clicked is told why
        else:
            assert response.status_code == 403


# -- the role matrix: what the UI offers -------------------------------------------------------


@pytest.mark.parametrize("role", ROLES[1:])
@pytest.mark.parametrize("action", ACTIONS, ids=str)
def test_it_offers_each_action_only_to_the_roles_allowed(world, action, role):
    target = action.arrange(world)
    response, found = controls(world.client(role), target.page)
    assert response.status_code in (200, 403)
    if action.offered.startswith("input:"):
        offered = action.offered.removeprefix("input:") in found.inputs
    elif action.offered == "link":
        offered = target.url in found.links and controls(world.client(role), target.url)[1].posts >= {
            urlsplit(target.url).path
        }
    else:  # a form on the page, or a button that opens the action's dialog (a GET form) holding that form
        path = urlsplit(target.url).path
        offered = path in found.posts or (
            path in found.opens and path in controls(world.client(role), target.url)[1].posts
        )
    assert offered == (role in action.allowed), f"{action}: offered to {role}: {offered}"


@pytest.mark.parametrize("role,status", [("viewer", 403), ("operator", 403), ("admin", 200)])
@pytest.mark.parametrize(
    "page", ["failback:connections", "failback:connection", "failback:connection_new", "failback:connection_edit"]
)
def test_it_shows_vcenter_connections_to_administrators_only(world, page, role, status):
    connection = vcenter(world)
    url = reverse(page, args=[connection.pk] if page in ("failback:connection", "failback:connection_edit") else [])
    assert world.client(role).get(url).status_code == status
    nav = world.client(role).get(reverse("failback:dashboard")).content.decode()
    assert (f'href="{reverse("failback:connections")}"' in nav) == (status == 200)


@pytest.mark.parametrize("role", ROLES[1:])
def test_it_lets_every_role_read_and_export_the_audit_trail(world, role):
    session_in(SessionStatus.FAILBACK)(world)
    client = world.client(role)
    for fmt in ("csv", "json"):
        response = client.get(reverse("failback:audit_export", args=[fmt]))
        assert response.status_code == 200 and b"start_failback" in b"".join(response.streaming_content)


# -- login everywhere --------------------------------------------------------------------------

PUBLIC = {"login", "healthz", "readyz"}  # what an anonymous visitor (or a load balancer) may see
TOKEN_ONLY = {"metrics"}  # for the monitoring system: its own token or address list, never a login
SAMPLES = {"action": "commit", "fmt": "csv"}  # parameter values that reach the view; any other is an id


def every_url(resolver=None, prefix="", namespace=""):
    """(name, path) for every page, with sample values for its parameters. The admin site has its own
    login (tested below); the API authenticates by bearer token, not by the session (tests/test_api.py)."""
    for pattern in (resolver or get_resolver()).url_patterns:
        route = prefix + str(pattern.pattern)
        if route.startswith(("admin/", "api/")):
            continue
        if isinstance(pattern, URLResolver):
            yield from every_url(pattern, route, f"{pattern.namespace}:" if pattern.namespace else namespace)
        elif isinstance(pattern, URLPattern):
            path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: SAMPLES.get(m.group(1), "1"), route)
            yield namespace + (pattern.name or route), "/" + path


URLS = sorted(set(every_url()))


@pytest.mark.parametrize("name,path", URLS)
def test_it_requires_a_login_for_every_page(db, name, path):
    for method in ("get", "post"):
        response = getattr(Client(), method)(path)
        if name in PUBLIC:
            assert response.status_code in (200, 405, 503)  # 503: not ready (readyz), still no login
        elif name in TOKEN_ONLY:
            assert response.status_code in (401, 403, 405), f"{method.upper()} {path} is open"
        else:
            assert response.status_code == 302 and response.url.startswith(
                reverse("login")
            ), f"{method.upper()} {path} is open"


def test_it_walks_every_page_of_the_portal():
    names = {name for name, _ in URLS}
    assert {
        "failback:dashboard",
        "failback:action",
        "failback:plan_action",
        "failback:connection_action",
        "failback:audit_export",
        "login",
    } <= names


def test_it_keeps_the_admin_site_behind_its_login(world):
    response = Client().get("/admin/failback/auditevent/")
    assert response.status_code == 302 and "/login/" in response.url
    assert world.client("viewer").get("/admin/").status_code == 302  # not staff: back to the admin's login


# -- CSRF on every POST ------------------------------------------------------------------------


@pytest.mark.parametrize("name,path", URLS)
def test_it_refuses_every_post_without_a_csrf_token(admin_user, name, path):
    before = db_state()
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    response = client.post(
        path,
        {
            "reason": "forged",
            "switch_at": in_an_hour(),
            "name": "forged",
            "username": "ada",
            "password": "ada-pass-1234",
        },
    )
    assert response.status_code == 403 and b"CSRF" in response.content
    assert db_state() == before


def test_it_accepts_a_post_with_the_token_from_the_page(world):
    """The positive control for the test above: the same client with the page's token gets through."""
    session = session_in(SessionStatus.FAILBACK)(world)
    client = world.client("operator", enforce_csrf_checks=True)
    client.get(reverse("failback:session", args=[session.pk]))
    token = client.cookies["csrftoken"].value
    response = client.post(reverse("failback:action", args=[session.pk, "commit"]), {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.COMMITTING


# -- forged ids of what belongs to someone else ------------------------------------------------


def test_it_refuses_revoking_another_users_api_token(world):
    row, secret = tokens.issue(world.admin, world.admin, "change-window script")
    client = world.client("operator")
    response = client.post(reverse("failback:token_revoke", args=[row.pk]), follow=True)
    assert "not one of your tokens" in response.content.decode()
    assert tokens.authenticate(secret) == world.admin  # still works
    refusal = AuditEvent.objects.get(action="api_token_revoked", outcome=Outcome.REFUSED)
    assert refusal.actor == world.operator and refusal.data["token_id"] == row.pk
    assert row.prefix not in client.get(reverse("failback:tokens")).content.decode()  # nor listed to another user


# -- websockets: login and origin --------------------------------------------------------------


def socket_paths():
    from failback.routing import websocket_urlpatterns

    return ["/" + re.sub(r"<(?:\w+:)?\w+>", "1", str(p.pattern)) for p in websocket_urlpatterns]


@pytest.fixture
def a_plan(operator):
    from failback.models import FailbackPlan

    return FailbackPlan.objects.create(name="wave S", created_by=operator)


@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.asyncio
@pytest.mark.parametrize("path", socket_paths())
async def test_it_closes_sockets_without_a_login_or_from_another_origin(lab, operator, a_plan, path):
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator

    from dr_portal.asgi import application

    session = await sync_to_async(start)(operator, await sync_to_async(replica_named)("app-crm"))
    if path.startswith("/ws/plans/"):
        path = path.replace("/1/", f"/{a_plan.pk}/")
    path = path.replace("/1/", f"/{session.pk}/")
    client = Client()
    await sync_to_async(client.force_login)(operator)
    cookie = (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())
    for headers, allowed in (
        ([(b"origin", b"http://localhost")], False),  # anonymous
        ([(b"origin", b"http://evil.example"), cookie], False),  # another site's page, with the user's cookie
        ([cookie], False),  # no origin at all
        ([(b"origin", b"http://localhost"), cookie], True),
    ):  # the portal's own page
        ws = WebsocketCommunicator(application, path, headers=headers)
        connected, code = await ws.connect()
        assert connected == allowed, (path, headers, code)
        await ws.disconnect()
