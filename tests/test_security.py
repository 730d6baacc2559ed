"""Login throttling, login audit, and the production profile's deployment check."""

import os
import secrets
import subprocess
import sys

import pytest
from django.test import Client

from failback.choices import Outcome
from failback.models import AuditEvent

from .conftest import ROOT

pytestmark = [pytest.mark.security, pytest.mark.django_db(databases="__all__")]


def try_login(client, username, password):
    return client.post("/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR="10.9.8.7")


def test_it_locks_a_user_out_after_repeated_failures_and_audits_it(operator, settings):
    settings.AXES_FAILURE_LIMIT = 3
    client = Client()
    for _ in range(3):
        assert try_login(client, "olivia", "wrong password").status_code in (200, 429)
    locked = try_login(client, "olivia", "olivia-pass-1234")  # the right password no longer helps
    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session
    failures = AuditEvent.objects.filter(action="login_failed", outcome=Outcome.REFUSED)
    assert (
        failures.count() >= 3
        and failures.first().actor_name == "olivia"
        and "wrong password" not in str(failures.first().data)
    )
    assert AuditEvent.objects.filter(action="login_locked_out", actor_name="olivia").exists()


def test_it_audits_logins(operator):
    client = Client()
    assert try_login(client, "olivia", "olivia-pass-1234").status_code == 302
    row = AuditEvent.objects.get(action="login")
    assert row.actor == operator and row.data["ip"] == "10.9.8.7"


def test_it_audits_a_failed_login_for_an_unknown_name(db):
    try_login(Client(), "mallory", "guess")
    row = AuditEvent.objects.get(action="login_failed")
    assert (row.actor, row.actor_name, row.outcome) == (None, "mallory", Outcome.REFUSED)


def test_it_passes_the_deployment_check_in_the_production_profile():
    env = dict(
        os.environ,
        DJANGO_SECRET_KEY=secrets.token_urlsafe(60),
        DJANGO_HTTPS="true",
        DJANGO_DEBUG="false",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/dr_portal",
        REDIS_URL="redis://127.0.0.1:6379/0",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
