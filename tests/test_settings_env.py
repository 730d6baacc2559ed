"""Settings from the environment: the typed readers in dr_portal/env.py, and README.md's table of them."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured

from dr_portal import env

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_SOURCE = (ROOT / "dr_portal" / "settings.py").read_text()
NAME = "DR_TEST_SETTING"


def refused(monkeypatch, value, reader, *args, **kwargs):
    monkeypatch.setenv(NAME, value)
    with pytest.raises(ImproperlyConfigured) as caught:
        reader(NAME, *args, **kwargs)
    message = str(caught.value)
    assert message.startswith(f"{NAME} must be "), message
    return message


def read(monkeypatch, value, reader, *args, **kwargs):
    if value is None:
        monkeypatch.delenv(NAME, raising=False)
    else:
        monkeypatch.setenv(NAME, value)
    return reader(NAME, *args, **kwargs)


def test_int(monkeypatch):
    assert read(monkeypatch, None, env.env_int, 120, min=2) == 120
    assert read(monkeypatch, "  ", env.env_int, 120, min=2) == 120  # blank is unset
    assert read(monkeypatch, " 7 ", env.env_int, 120, min=2) == 7
    assert read(monkeypatch, "2", env.env_int, 120, min=2, max=2) == 2
    assert (
        refused(monkeypatch, "abc", env.env_int, 120, min=2, unit="seconds")
        == f"{NAME} must be a whole number of seconds >= 2, got 'abc'"
    )
    assert "got '1'" in refused(monkeypatch, "1", env.env_int, 120, min=2)
    assert "<= 5" in refused(monkeypatch, "6", env.env_int, 1, max=5)
    for bad in ("1.5", "1e3", "ten"):
        refused(monkeypatch, bad, env.env_int, 1)


def test_float(monkeypatch):
    assert read(monkeypatch, None, env.env_float, 10.0, above=0) == 10.0
    assert read(monkeypatch, "0.25", env.env_float, 10.0, above=0) == 0.25
    assert read(monkeypatch, "3", env.env_float, 0.5, min=0) == 3.0
    assert read(monkeypatch, "0", env.env_float, 0.5, min=0) == 0.0
    assert (
        refused(monkeypatch, "abc", env.env_float, 10.0, above=0, unit="seconds")
        == f"{NAME} must be a number of seconds > 0, got 'abc'"
    )
    assert "> 0" in refused(monkeypatch, "0", env.env_float, 10.0, above=0)
    assert ">= 0" in refused(monkeypatch, "-1", env.env_float, 0.5, min=0)
    for bad in ("nan", "inf", "-inf", "1,5"):
        refused(monkeypatch, bad, env.env_float, 1.0)
    assert not math.isnan(read(monkeypatch, "1e-3", env.env_float, 1.0))


def test_bool(monkeypatch):
    assert read(monkeypatch, None, env.env_bool, False) is False
    assert read(monkeypatch, None, env.env_bool, True) is True
    for word in ("1", "true", "Yes", "ON"):
        assert read(monkeypatch, word, env.env_bool, False) is True
    for word in ("0", "false", "No", "off"):
        assert read(monkeypatch, word, env.env_bool, True) is False
    assert "true or false" in refused(monkeypatch, "maybe", env.env_bool, False)


def test_str_with_a_check_and_secrets(monkeypatch):
    assert read(monkeypatch, None, env.env_str, "UTC") == "UTC"
    assert read(monkeypatch, " Europe/Paris ", env.env_str, "UTC", check=lambda v: "/" in v) == "Europe/Paris"
    assert (
        refused(monkeypatch, "Paris", env.env_str, "UTC", check=lambda v: "/" in v, form="a zone")
        == f"{NAME} must be a zone, got 'Paris'"
    )

    def raises(value):
        raise LookupError(value)

    refused(monkeypatch, "x", env.env_str, check=raises, form="a thing")
    message = refused(monkeypatch, "hunter2", env.env_str, check=lambda v: len(v) > 10, form="long", secret=True)
    assert "hunter2" not in message  # the message names the variable, never a secret's value


def test_list(monkeypatch):
    assert read(monkeypatch, None, env.env_list, "a, b") == ["a", "b"]
    assert read(monkeypatch, None, env.env_list) == []
    assert read(monkeypatch, " x ,, y ,", env.env_list, "a") == ["x", "y"]


def test_url(monkeypatch):
    assert read(monkeypatch, None, env.env_url) == ""
    assert read(monkeypatch, "postgres://u@h:5432/db", env.env_url) == "postgres://u@h:5432/db"
    assert read(monkeypatch, "rediss://h:6379/1", env.env_url, schemes=("redis", "rediss")) == "rediss://h:6379/1"
    assert (
        refused(monkeypatch, "http://h", env.env_url, schemes=("redis", "rediss"))
        == f"{NAME} must be a redis:// or rediss:// URL, got 'http://h'"
    )
    assert "database URL" in refused(monkeypatch, "nonsense", env.env_url, form="a database URL")


def test_path_and_choice(monkeypatch, tmp_path):
    assert read(monkeypatch, None, env.env_path, tmp_path / "x") == tmp_path / "x"
    assert read(monkeypatch, "/srv/lab", env.env_path, tmp_path) == Path("/srv/lab")
    assert read(monkeypatch, "debug", env.env_choice, "INFO", env.LOG_LEVELS, upper=True) == "DEBUG"
    assert (
        refused(monkeypatch, "loud", env.env_choice, "INFO", ("INFO", "DEBUG"), upper=True)
        == f"{NAME} must be one of INFO, DEBUG, got 'loud'"
    )


def test_every_reader_records_the_name_it_read(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    for reader, args in (
        (env.env_int, (1,)),
        (env.env_float, (1.0,)),
        (env.env_bool, (False,)),
        (env.env_str, ()),
        (env.env_list, ()),
        (env.env_url, ()),
        (env.env_path, ("/x",)),
        (env.env_choice, ("A", ("A",))),
    ):
        env.READ.pop(NAME, None)
        reader(NAME, *args)
        assert NAME in env.READ, reader.__name__


def start_django(tmp_path, **environment):
    """Import the settings in a fresh process with these variables set; what start-up says, and its exit code."""
    base = {k: v for k, v in os.environ.items() if k not in environment}
    probe = "import django; django.setup(); print('started')"
    return subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "DJANGO_SETTINGS_MODULE": "dr_portal.settings", "DR_PORTAL_VAR": str(tmp_path), **environment},
    )


def test_a_bad_value_stops_start_up_with_the_variable_named(tmp_path):
    result = start_django(tmp_path, FAILBACK_STALL_SECONDS="abc")
    assert result.returncode != 0
    assert "FAILBACK_STALL_SECONDS must be a whole number of seconds >= 2, got 'abc'" in result.stderr
    # The cross-check stays: a heartbeat must come well within the stall limit.
    result = start_django(tmp_path, FAILBACK_STALL_SECONDS="30", FAILBACK_HEARTBEAT_SECONDS="30")
    assert result.returncode != 0 and "FAILBACK_HEARTBEAT_SECONDS must be below FAILBACK_STALL_SECONDS" in result.stderr
    result = start_django(
        tmp_path, FAILBACK_STALL_SECONDS="30", FAILBACK_HEARTBEAT_SECONDS="2.5", TIME_ZONE="Europe/Paris"
    )
    assert result.returncode == 0 and "started" in result.stdout, result.stderr


# -- the README's configuration table ---------------------------------------------------------------------


def readme_table():
    """{variable: (default cell, meaning cell)} from the table under README.md's '## Configuration'."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no '## Configuration' section"
    rows = {}
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and (name := re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0])):
            rows[name.group(1)] = (cells[1], cells[2])
    return rows


def names_the_settings_read():
    """Every variable named in a call to an env reader in settings.py, whichever profile branch it is in."""
    return set(re.findall(r"\benv_[a-z]+\(\s*\"([A-Z][A-Z0-9_]*)\"", SETTINGS_SOURCE))


def test_settings_read_the_environment_only_through_the_typed_readers():
    assert not re.search(r"os\.environ|os\.getenv|\bgetenv\(", SETTINGS_SOURCE)
    # The scan finds every name this process's settings import actually read (so it misses none).
    assert set(env.READ) - {NAME} <= names_the_settings_read()


def test_the_readme_lists_every_setting_the_code_reads_and_no_other():
    table, names = readme_table(), names_the_settings_read()
    assert len(names) >= 25
    assert not names - set(table), f"missing from README.md's configuration table: {sorted(names - set(table))}"
    assert not set(table) - names, f"in README.md's table but not read by the settings: {sorted(set(table) - names)}"
    for name, (default, meaning) in table.items():
        assert default and meaning, name


def test_the_readme_gives_the_code_s_default_for_every_number_switch_and_word():
    table = readme_table()
    checked = 0
    for name, default in env.READ.items():
        if name not in table or isinstance(default, Path) or default in ("", None):
            continue  # paths and unset-by-default values are described in words
        if isinstance(default, bool):
            shown = str(default).lower()
        else:
            shown = default if isinstance(default, str) else f"{default:g}"
        assert table[name][0].startswith(f"`{shown}`"), f"{name}: README says {table[name][0]}, the code {shown}"
        checked += 1
    assert checked >= 20
    assert django_settings.FAILBACK_HEARTBEAT_SECONDS < django_settings.FAILBACK_STALL_SECONDS
