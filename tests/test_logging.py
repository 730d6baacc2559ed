"""Structured logs: every line a failback's step logs carries the session's id and the step's name, and
LOG_FORMAT=json writes one JSON object per line."""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from failback import workflow
from failback.choices import SessionStatus
from failback.logging_context import JsonFormatter, SessionFilter
from failback.models import FailbackSession

from .helpers import replica_named, start

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def json_lines():
    """The root logger's lines as the JSON handler of LOG_FORMAT=json writes them, parsed back."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SessionFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _steps(lines):
    """{step: [lines logged from its 'started' line to its 'ended' line, both included]} (steps run inline here)."""
    steps, current = {}, None
    for line in lines:
        if line["message"].endswith(" started") and line.get("step"):
            current = line["step"]
            steps.setdefault(current, [])
        if current:
            steps[current].append(line)
        if current and " ended " in line["message"] and line.get("step") == current:
            current = None
    return steps


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_it_puts_the_session_id_on_every_line_of_a_failbacks_steps(lab, operator, json_lines):
    replica = replica_named("app-erp")
    lab.set_vm_options(replica.vm_id, shutdown_seconds=0.2)
    session = start(operator, replica)  # phase 1 runs inline (django-q2's sync mode)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.READY_TO_SWITCH
    workflow.switch_now(operator, session.pk)
    workflow.commit(operator, session.pk)
    session.refresh_from_db()
    assert session.status == SessionStatus.COMMITTED, session.error

    lines = json_lines()
    steps = _steps(lines)
    assert {"phase1", "switch", "commit"} <= set(steps), [line["message"] for line in lines]
    for name, logged in steps.items():
        assert logged[-1]["message"].startswith(f"{name} ended after ")
        for line in logged:
            assert line["session_id"] == session.pk, line
            assert line["step"] == name, line
            assert line["level"] in ("INFO", "WARNING", "ERROR") and line["logger"] and line["time"].endswith("+00:00")
    outside = [line for line in lines if not any(line in logged for logged in steps.values())]
    assert all("session_id" not in line for line in outside), outside  # the id goes away with the step


def _run_with(env, code):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "DJANGO_SETTINGS_MODULE": "dr_portal.settings", **env}
    environ.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True
    )


LOG_TWO_LINES = (
    "import logging; from failback.logging_context import bound\n"
    "log = logging.getLogger('failback.jobs.phase1')\n"
    "with bound(session_id=42, step='phase1'):\n"
    "    log.warning('copying %s', 'scsi0:0')\n"
    "log.warning('outside')\n"
)


def test_it_writes_json_lines_when_log_format_asks_for_them():
    done = _run_with({"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}, LOG_TWO_LINES)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    inside, outside = [line for line in lines if line["message"] in ("copying scsi0:0", "outside")]
    assert inside["session_id"] == 42 and inside["step"] == "phase1"
    assert inside["logger"] == "failback.jobs.phase1" and inside["level"] == "WARNING"
    assert "session_id" not in outside and "step" not in outside


def test_it_names_the_session_in_plain_lines_too():
    done = _run_with({"LOG_FORMAT": "plain"}, LOG_TWO_LINES)
    assert done.returncode == 0, done.stderr
    inside, outside = done.stderr.splitlines()[-2:]
    assert inside.endswith("WARNING failback.jobs.phase1 session_id=42 step=phase1 copying scsi0:0")
    assert outside.endswith("WARNING failback.jobs.phase1 outside")


def test_it_refuses_an_unknown_log_format():
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "dr_portal.settings",
        "LOG_FORMAT": "xml",
    }
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, env=environ, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "LOG_FORMAT must be one of plain, json, got 'xml'" in done.stderr
