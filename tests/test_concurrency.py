"""Two people press at once: exactly one effect, the other a clear, audited refusal."""

import threading

import pytest
from django.db import connection

from failback import workflow
from failback.choices import Outcome, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession

from .helpers import replica_named, start

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.faults]


def race(*calls):
    """Run the calls in threads released together; return what each returned or raised."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i, call):
        try:
            barrier.wait()
            results[i] = call()
        except Exception as exc:
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def split(results):
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, workflow.Refused)]
    assert len(ok) + len(refused) == len(results), results  # nothing crashed
    return ok, refused


@pytest.fixture
def in_failback(lab, operator):
    """A real failback (phase 1, automatic switch) run by the inline worker, now waiting for commit or undo."""
    session = start(operator, replica_named(""), switch_mode=SwitchMode.AUTO)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK
    return session


def test_it_commits_once_when_two_operators_press_commit(in_failback, operator):
    ok, refused = split(
        race(lambda: workflow.commit(operator, in_failback.pk), lambda: workflow.commit(operator, in_failback.pk))
    )
    assert len(ok) == 1 and len(refused) == 1
    assert FailbackSession.objects.get(pk=in_failback.pk).status == SessionStatus.COMMITTED
    assert AuditEvent.objects.filter(action="commit", outcome=Outcome.OK).count() == 1
    assert AuditEvent.objects.filter(action="commit", outcome=Outcome.REFUSED).count() == 1


def test_it_lets_only_one_of_commit_and_undo_win(in_failback, operator):
    ok, refused = split(
        race(lambda: workflow.commit(operator, in_failback.pk), lambda: workflow.undo(operator, in_failback.pk))
    )
    assert len(ok) == 1 and len(refused) == 1
    status = FailbackSession.objects.get(pk=in_failback.pk).status
    assert status in (SessionStatus.COMMITTED, SessionStatus.UNDONE)
    assert AuditEvent.objects.filter(action__in=["commit", "undo"], outcome=Outcome.OK).count() == 1


def test_it_switches_once_when_switch_now_races_itself(lab, operator):
    session = start(operator, replica_named(""), switch_mode=SwitchMode.MANUAL)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.READY_TO_SWITCH
    ok, refused = split(race(*[lambda: workflow.switch_now(operator, session.pk)] * 3))
    assert len(ok) == 1 and len(refused) == 2
    assert AuditEvent.objects.filter(action="switch", outcome=Outcome.OK).count() == 1
    assert AuditEvent.objects.filter(action="stop_replica").count() == 1  # phase 2 ran once
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK


def test_it_starts_one_failback_when_two_start_the_same_replica(lab, operator):
    replica = replica_named("")
    ok, refused = split(
        race(lambda: start(operator, replica, vm_name="a-prod"), lambda: start(operator, replica, vm_name="b-prod"))
    )
    assert len(ok) == 1 and len(refused) == 1
    assert FailbackSession.objects.filter(replica=replica).count() == 1
