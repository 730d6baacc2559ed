"""The rough edges a newcomer meets on the first day: the port, a user created from a script, the audit's
words, the favicon, the packaging warning and the start-up noise of every command."""

import re
import subprocess
import sys
import tomllib

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from failback import workflow
from failback.choices import AuditAction, SwitchMode

from .conftest import ROOT, subprocess_env
from .helpers import replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def manage(settings, *args, stdin=subprocess.DEVNULL):
    """manage.py in a process of its own, without a terminal (a new session has no controlling tty)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=subprocess_env(settings),
        cwd=ROOT,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )


def test_it_says_how_to_give_a_password_when_there_is_no_terminal(settings):
    done = manage(settings, "create_user", "bob", "--role", "viewer")

    assert done.returncode == 1
    assert "No password for bob: pass --password, or run the command in a terminal to type it." in done.stderr
    assert "Traceback" not in done.stderr and "EOFError" not in done.stderr
    assert not User.objects.filter(username="bob").exists()


def test_it_still_creates_a_user_with_a_password_and_logs_no_axes_banner(settings):
    done = manage(settings, "create_user", "bob", "--role", "viewer", "--password", "a-long-pass-phrase-42")

    assert done.returncode == 0, done.stderr
    assert "Created bob (Viewer)." in done.stdout
    assert "AXES: BEGIN" not in done.stderr  # django-axes' start-up banner on every command
    assert User.objects.get(username="bob").groups.get().name == "Viewer"


def test_it_names_audit_actions_in_words_in_the_event_log_and_the_report(lab, operator):
    session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO, shutdown_timeout_s=1)
    workflow.commit(operator, session.pk)
    client = Client()
    client.force_login(operator)

    for url in (reverse("failback:session", args=[session.pk]), reverse("failback:report", args=[session.pk])):
        page = client.get(url).content.decode()
        for action in (AuditAction.START_FAILBACK, AuditAction.FINISH_SWITCH, AuditAction.FINISH_COMMIT):
            assert action.label in page, (url, action)
        raw = [a.value for a in AuditAction if f"</strong> {a.value} " in page or f"<td>{a.value}</td>" in page]
        assert not raw, (url, raw)  # no stored snake_case name where people read


def test_it_links_a_favicon_the_policy_allows(operator):
    client = Client()
    client.force_login(operator)
    page = client.get(reverse("failback:dashboard"))
    href = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', page.content.decode()).group(1)
    icon = client.get(href)
    assert icon.status_code == 200 and b"<svg" in b"".join(icon.streaming_content)
    assert "'self'" in page.headers["Content-Security-Policy"].split("img-src")[1].split(";")[0]


def test_it_declares_the_licence_as_an_spdx_expression():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # the table form is deprecated by setuptools


def test_it_lets_make_run_choose_the_port():
    plan = subprocess.run(["make", "-n", "run", "PORT=8123"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "manage.py runportal --port 8123" in plan.stdout
    readme = (ROOT / "README.md").read_text()
    assert "make run PORT=" in readme and "runportal --port" in readme
