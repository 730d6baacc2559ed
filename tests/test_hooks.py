"""Hooks at every step: real commands from an allow-list file, run by the worker during real lab failbacks.

What must hold: each chosen hook runs once at its point with the session's facts and none of the
worker's environment; its exit code and (bounded) output are in the audit trail and the evidence file; a
failing hook marked "fail" stops the step before anything is done to the replica; a hook that hangs is
killed at its timeout; names and points outside the allow-list are refused at the start.
"""

import filecmp
import os
from pathlib import Path

import pytest

from failback import evidence, workflow
from failback.choices import AuditAction, Outcome, SessionStatus, SwitchMode
from failback.hypervisors.base import POWERED_OFF, POWERED_ON
from failback.models import AuditEvent, FailbackSession
from failback.workflow import Refused

from .helpers import replica_named, start

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.beyond]
POINTS = ["before_phase1", "before_switch", "after_switch", "after_commit", "after_undo"]


@pytest.fixture
def allow_list(tmp_path, settings):
    """An allow-list with a recorder (writes its environment to a file per point), a refuser, a hang and a
    chatterbox; the recorder is the default for the app-erp replica's switch."""
    out = tmp_path / "hook-out"
    out.mkdir()
    record = 'env | sort > "$OUT/$DRPORTAL_SESSION_ID-$DRPORTAL_POINT.env"; echo recorded $DRPORTAL_POINT'
    path = tmp_path / "hooks.toml"
    path.write_text(
        f"""
[hooks.record]
command = ["/bin/sh", "-c", {record!r}]
timeout_s = 20
env = {{ OUT = "{out}" }}

[hooks.erp-default]
command = ["/bin/sh", "-c", {record!r}]
env = {{ OUT = "{out}" }}
default_points = ["before_switch"]
replicas = ["app-erp*"]

[hooks.refuse]
command = ["/bin/sh", "-c", "echo the load balancer says no; exit 3"]
on_error = "fail"

[hooks.hang]
command = ["/bin/sleep", "60"]
timeout_s = 1
on_error = "continue"

[hooks.chatty]
command = ["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\\\0' x; exit 1"]
on_error = "continue"
"""
    )
    settings.FAILBACK_HOOKS_FILE = str(path)
    os.environ["DRPORTAL_TEST_SECRET"] = "must-not-leak"  # the worker's environment stays the worker's
    yield out
    os.environ.pop("DRPORTAL_TEST_SECRET", None)


def hook_rows(session):
    return list(AuditEvent.objects.filter(session=session, action=AuditAction.RUN_HOOK).order_by("at", "id"))


def env_of(out, session, point):
    lines = (out / f"{session.pk}-{point}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def assert_disks_identical(lab, session):
    for disk in session.disks.all():
        src, dst = lab.disk_path(session.replica.vm_id, disk.key), lab.disk_path(session.production_vm_id, disk.key)
        assert filecmp.cmp(src, dst, shallow=False), disk.key


def test_hooks_run_once_at_every_point_with_the_sessions_facts_and_nothing_else(lab, operator, allow_list):
    chosen = {point: ["record"] for point in POINTS}
    kept = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO, hooks=chosen)
    undone = start(operator, replica_named("web-01"), switch_mode=SwitchMode.AUTO, hooks=chosen)
    workflow.commit(operator, kept.pk, reason="keep")
    workflow.undo(operator, undone.pk, reason="back")
    for session, last in ((kept, "after_commit"), (undone, "after_undo")):
        session = FailbackSession.objects.select_related("replica").get(pk=session.pk)
        ran = ["before_phase1", "before_switch", "after_switch", last]
        rows = hook_rows(session)
        assert [(r.data["point"], r.outcome) for r in rows] == [(p, Outcome.OK) for p in ran]  # once each, in order
        assert all(r.data["output"].strip() == f"recorded {r.data['point']}" for r in rows)
        for point in ran:
            env = env_of(allow_list, session, point)
            assert env["DRPORTAL_POINT"] == point and env["DRPORTAL_SESSION_ID"] == str(session.pk)
            assert env["DRPORTAL_REPLICA"] == session.replica.name
            assert env["DRPORTAL_PRODUCTION_VM"] == session.vm_name
            assert "DRPORTAL_TEST_SECRET" not in env and "DATABASE_URL" not in env and "DJANGO_SECRET_KEY" not in env
        assert env_of(allow_list, session, "before_phase1")["DRPORTAL_PRODUCTION_VM_ID"] == ""  # not built yet
        assert env_of(allow_list, session, "after_switch")["DRPORTAL_PRODUCTION_VM_ID"] == session.production_vm_id
        assert env_of(allow_list, session, last)["DRPORTAL_STATUS"] == session.status  # the step already happened
        listed = evidence.payload(session)["hooks"]
        assert [(h["point"], h["hook"], h["exit_code"]) for h in listed] == [(p, "record", 0) for p in ran]
    assert FailbackSession.objects.get(pk=kept.pk).status == SessionStatus.COMMITTED
    assert FailbackSession.objects.get(pk=undone.pk).status == SessionStatus.UNDONE


def test_a_failing_hook_before_the_switch_stops_it_with_the_replica_still_running(lab, operator, allow_list):
    session = start(operator, replica_named("app-crm"), hooks={"before_switch": ["refuse"]})
    workflow.switch_now(operator, session.pk, reason="CHG-9")
    session = FailbackSession.objects.select_related("replica").get(pk=session.pk)
    assert session.status == SessionStatus.FAILED
    assert lab.power_state(session.replica.vm_id) == POWERED_ON  # never went down
    assert session.replica_stop_started_at is None and session.replica_off_at is None
    (row,) = hook_rows(session)
    assert row.outcome == Outcome.FAILED and row.data["exit_code"] == 3
    assert "the load balancer says no" in row.data["output"] and row.detail.endswith("the step fails")
    assert "refuse" in session.error


def test_a_hanging_hook_is_killed_at_its_timeout_and_a_chatty_ones_output_is_bounded(lab, operator, allow_list):
    session = start(
        operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO, hooks={"before_switch": ["hang", "chatty"]}
    )
    session = FailbackSession.objects.select_related("replica").get(pk=session.pk)
    assert session.status == SessionStatus.FAILBACK  # both failed, both said "continue"
    assert lab.power_state(session.production_vm_id) == POWERED_ON or not session.power_on_after
    assert lab.power_state(session.replica.vm_id) == POWERED_OFF
    assert_disks_identical(lab, session)
    hang, chatty = hook_rows(session)
    assert hang.data["timed_out"] and hang.outcome == Outcome.FAILED and "killed" in hang.detail
    assert chatty.data["exit_code"] == 1 and "the failback continues" in chatty.detail
    assert len(chatty.data["output"]) < 2 * 4096 + 100 and "bytes left out" in chatty.data["output"]


def test_the_allow_lists_defaults_apply_and_anything_outside_it_is_refused(lab, operator, allow_list):
    for hooks, message in (
        ({"before_switch": ["rm-rf"]}, "'rm-rf' is not in the allow-list"),
        ({"during_lunch": ["record"]}, "unknown hook point 'during_lunch'"),
        ({"before_switch": "record"}, "must be a list of hook names"),
    ):
        refused_before = AuditEvent.objects.filter(outcome=Outcome.REFUSED).count()
        with pytest.raises(Refused, match=message):
            start(operator, replica_named("app-crm"), hooks=hooks)
        assert AuditEvent.objects.filter(outcome=Outcome.REFUSED).count() == refused_before + 1
    erp = start(operator, replica_named("app-erp"))  # no hooks named: the file's defaults for app-erp*
    assert FailbackSession.objects.get(pk=erp.pk).hooks == {"before_switch": ["erp-default"]}
    crm = start(operator, replica_named("app-crm"))
    assert FailbackSession.objects.get(pk=crm.pk).hooks == {}


def test_a_broken_allow_list_refuses_the_start_with_the_reason(lab, operator, settings, tmp_path):
    path = Path(tmp_path / "hooks.toml")
    path.write_text('[hooks.bad]\ncommand = "rm -rf /"\n')
    settings.FAILBACK_HOOKS_FILE = str(path)
    with pytest.raises(Refused, match="'command' must be a non-empty list of strings"):
        start(operator, replica_named("app-crm"))


def test_the_api_lists_the_allow_list_without_its_commands(operator, allow_list, settings, tmp_path):
    from django.test import Client

    from .test_api import API, bearer, token_for

    auth = bearer(token_for(operator))
    body = Client().get(f"{API}/hooks", **auth).json()
    assert list(body["points"]) == list(POINTS)
    hooks = {h["name"]: h for h in body["hooks"]}
    assert set(hooks) == {"record", "erp-default", "refuse", "hang", "chatty"}
    assert hooks["erp-default"]["default_points"] == ["before_switch"] and hooks["erp-default"]["replicas"] == [
        "app-erp*"
    ]
    assert hooks["hang"] == {**hooks["hang"], "timeout_s": 1, "on_error": "continue"}
    assert "command" not in hooks["record"] and "env" not in hooks["record"]  # the commands stay the worker's
    broken = Path(tmp_path / "broken.toml")
    broken.write_text('[hooks.bad]\ncommand = "rm -rf /"\n')
    settings.FAILBACK_HOOKS_FILE = str(broken)
    answer = Client().get(f"{API}/hooks", **auth)
    assert answer.status_code == 409 and "'command' must be a non-empty list" in answer.json()["detail"]
