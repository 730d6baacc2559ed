"""Password spraying: one address trying one password on many user names is locked out as an address, and
the audit trail records the spray without growing by one row per attempt."""

import secrets

import pytest
from django.conf import global_settings
from django.test import Client

from dr_portal import settings as project_settings
from failback.choices import Outcome
from failback.models import AuditEvent

pytestmark = [pytest.mark.security, pytest.mark.django_db(databases="__all__")]


@pytest.fixture(autouse=True)
def limits(settings):
    settings.CACHES = getattr(
        project_settings, "CACHES", global_settings.CACHES
    )  # the portal's own (Redis in production), not conftest's
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.LOGIN_FAILURE_LIMIT_PER_NAME = 3
    settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS = 6
    settings.LOGIN_AUDIT_ROWS_PER_ADDRESS = 4


def address():
    """A fresh address per test: the counters live in the cache (Redis in the production profile), not in the test database."""
    return "10." + ".".join(str(secrets.randbelow(250) + 1) for _ in range(3))


def try_login(username, password, ip):
    return Client().post("/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)


def test_an_address_spraying_many_names_is_locked_out(operator):
    sprayer, elsewhere = address(), address()
    for i in range(5):  # one guess per name: no name reaches its own limit
        assert try_login(f"user{i}", "Summer2026!", sprayer).status_code == 200
    assert try_login("user5", "Summer2026!", sprayer).status_code == 429  # the address's 6th failure locks it
    assert (
        try_login("olivia", "olivia-pass-1234", sprayer).status_code == 429
    )  # the address is locked, even with the right password
    assert try_login("olivia", "olivia-pass-1234", elsewhere).status_code == 302  # the user is not
    assert AuditEvent.objects.filter(action="login_locked_out", data__ip=sprayer).exists()


def test_one_name_is_still_locked_out_after_a_few_failures_from_an_address(operator):
    ip = address()
    for _ in range(3):
        try_login("olivia", "wrong", ip)
    assert try_login("olivia", "olivia-pass-1234", ip).status_code == 429
    assert (
        try_login("victor", "anything", ip).status_code == 200
    )  # below the address's own limit: other names may still try


def test_a_valid_login_does_not_reset_the_addresss_count(operator):
    ip = address()
    for i in range(5):
        try_login(f"user{i}", "Summer2026!", ip)
    assert try_login("olivia", "olivia-pass-1234", ip).status_code == 302  # the attacker's own account, say
    try_login("user5", "Summer2026!", ip)
    assert try_login("user6", "Summer2026!", ip).status_code == 429


def test_a_spray_adds_a_bounded_number_of_audit_rows_that_still_say_how_many(db):
    sprayer, bystander = address(), address()
    for i in range(60):
        try_login(f"name{i}", "Summer2026!", sprayer)
    failed = AuditEvent.objects.filter(action="login_failed", data__ip=sprayer).order_by("id")
    each = [r for r in failed if not r.data.get("summary")]
    assert [r.actor_name for r in each] == ["name0", "name1", "name2", "name3"]  # the first few in full
    summaries = [r for r in failed if r.data.get("summary")]
    assert [r.data["count"] for r in summaries] == [20, 50]  # then one row at 20, 50, 100, …
    assert summaries[-1].outcome == Outcome.REFUSED and summaries[-1].detail.startswith(
        f"50 failed logins from {sprayer} within 15 min"
    )
    assert summaries[-1].data["last_username"] == "name49"
    locked = [
        r for r in AuditEvent.objects.filter(action="login_locked_out", data__ip=sprayer) if not r.data.get("summary")
    ]
    assert len(locked) == 4  # every refused attempt while locked out fires a lock-out too: bounded the same way
    assert AuditEvent.objects.filter(data__ip=sprayer).count() <= 4 + 2 + 4 + 2  # not 60 or 120
    try_login("someone", "guess", bystander)  # another address has its own budget
    assert AuditEvent.objects.filter(action="login_failed", data__ip=bystander, actor_name="someone").exists()
