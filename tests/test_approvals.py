"""Four eyes on the buttons that cause downtime or lose data: a second person approves, never the requester.

Over real lab failbacks and the service layer (the page and the API call the same functions): an action
that needs approval waits as a request and does nothing; the requester cannot approve it; a Viewer
cannot; another Operator can, and it then runs as the requester's with both names audited; approve and
reject racing end with one decision and the action done at most once; an expired request does nothing.
"""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from failback import approvals, automatic, plans, tasks, workflow
from failback.choices import AuditAction, Outcome, SessionStatus, SwitchMode
from failback.models import ApprovalRequest, AuditEvent, FailbackSession
from failback.workflow import Refused

from .conftest import make_user
from .helpers import network_map, replica_named, start
from .test_api import API, bearer, token_for

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.beyond]
Status = ApprovalRequest.Status


@pytest.fixture
def second(db):
    return make_user("sam", "Operator")


def failback_waiting_for_commit(operator):
    session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK
    return session


def rows(session, action):
    return list(AuditEvent.objects.filter(session=session, action=action).order_by("id"))


def test_a_commit_that_needs_approval_waits_and_runs_as_the_requesters_once_another_person_approves(
    lab, operator, second, viewer, admin_user
):
    session = failback_waiting_for_commit(operator)
    with pytest.raises(Refused, match="Administrator role"):
        approvals.set_rule(operator, "commit")
    approvals.set_rule(admin_user, "commit")

    with pytest.raises(approvals.ApprovalRequested, match="needs a second person's approval") as asked:
        workflow.commit(operator, session.pk, reason="CHG-5 keep")
    request = asked.value.request
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK  # nothing done yet
    assert [r.outcome for r in rows(session, AuditAction.REQUEST_APPROVAL)] == [Outcome.INFO]
    with pytest.raises(Refused, match="already waits for approval"):  # one waiting request per action
        workflow.commit(operator, session.pk, reason="again")

    with pytest.raises(Refused, match="a second person must approve"):
        approvals.approve(operator, request.pk)
    with pytest.raises(Refused, match="Operator role is needed"):
        approvals.approve(viewer, request.pk)
    assert ApprovalRequest.objects.get(pk=request.pk).status == Status.PENDING

    done = approvals.approve(second, request.pk, reason="checked with the app owner")
    assert done.status == Status.DONE
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.COMMITTED
    (commit,) = [r for r in rows(session, AuditAction.COMMIT) if r.outcome == Outcome.OK]
    assert commit.actor == operator and commit.outcome == Outcome.OK  # the requester's action
    assert commit.data["approved_by"] == second.username and commit.data["approval_request"] == request.pk
    (approval,) = [r for r in rows(session, AuditAction.APPROVE) if r.outcome == Outcome.OK]
    assert approval.actor == second and operator.username in approval.detail
    with pytest.raises(Refused, match=r"already decided by sam \(approved and done\)"):
        approvals.approve(admin_user, request.pk)


def race(request_id, *deciders):
    """Each (name, decide, who) at the same moment on its own connection: name -> status, or the refusal."""
    barrier, results = threading.Barrier(len(deciders)), {}

    def decide(name, call, who):
        barrier.wait()
        try:
            results[name] = call(who, request_id).status
        except Refused as refused:
            results[name] = refused.message
        finally:
            connection.close()

    threads = [threading.Thread(target=decide, args=d) for d in deciders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_approve_and_reject_at_once_end_with_one_decision_and_the_action_done_at_most_once(
    lab, operator, second, admin_user
):
    third = make_user("tia", "Operator")
    session = failback_waiting_for_commit(operator)
    approvals.set_rule(admin_user, "undo")
    for attempt in range(3):
        try:
            workflow.undo(operator, session.pk, reason=f"try {attempt}")
        except approvals.ApprovalRequested as asked:
            request = asked.request
        results = race(request.pk, ("approve", approvals.approve, second), ("reject", approvals.reject, third))
        final = ApprovalRequest.objects.get(pk=request.pk).status
        decided = [v for v in results.values() if v in (Status.DONE, Status.REJECTED)]
        assert len(decided) == 1 and final == decided[0], results  # one winner; the loser was told why
        if final == Status.DONE:
            break
    undos = [r for r in rows(session, AuditAction.UNDO) if r.outcome == Outcome.OK]
    assert len(undos) == (1 if final == Status.DONE else 0)


def test_an_expired_request_does_nothing_and_says_so(lab, operator, second, admin_user):
    session = failback_waiting_for_commit(operator)
    approvals.set_rule(admin_user, "commit")
    with pytest.raises(approvals.ApprovalRequested) as asked:
        workflow.commit(operator, session.pk)
    ApprovalRequest.objects.filter(pk=asked.value.request.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    tasks.watchdog()  # every minute: marked expired and audited without anyone looking
    assert ApprovalRequest.objects.get(pk=asked.value.request.pk).status == Status.EXPIRED
    with pytest.raises(Refused, match=r"already decided \(expired\)"):
        approvals.approve(second, asked.value.request.pk)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK
    assert len(rows(session, AuditAction.APPROVAL_EXPIRED)) == 1
    with pytest.raises(approvals.ApprovalRequested):  # a new request may be made after the expiry
        workflow.commit(operator, session.pk)


def test_a_plans_rule_covers_its_members_only_and_the_api_answers_202_then_approves(lab, operator, second, admin_user):
    plan = plans.start_plan(
        operator,
        name="wave",
        switch_mode=SwitchMode.AUTO,
        members=[
            {
                "replica_id": (r := replica_named("web-01")).pk,
                "vm_name": f"{r.source_name}-prod",
                "target_host": "esx-prod-01",
                "target_datastore": "prod-ds-01",
                "network_map": network_map(r),
            }
        ],
    )
    alone = failback_waiting_for_commit(operator)
    approvals.set_rule(admin_user, "undo", plan=plan)
    workflow.undo(operator, alone.pk, reason="not in the plan")  # no rule for it: done at once
    member = plan.sessions.get()
    assert FailbackSession.objects.get(pk=member.pk).status == SessionStatus.FAILBACK

    asked = Client().post(
        f"{API}/sessions/{member.pk}/undo", {"reason": "CHG-8"}, content_type="application/json",
        **bearer(token_for(operator)),
    )  # fmt: skip
    assert asked.status_code == 202, asked.content
    body = asked.json()
    assert body["status"] == "pending" and body["action"] == "undo" and body["requested_by"] == operator.username
    approved = Client().post(
        f"{API}/approvals/{body['id']}/approve", {"reason": "ok"}, content_type="application/json",
        **bearer(token_for(second)),
    )  # fmt: skip
    assert approved.status_code == 200 and approved.json()["status"] == "done", approved.content
    assert FailbackSession.objects.get(pk=member.pk).status == SessionStatus.UNDONE


def test_the_approvals_page_lets_another_operator_approve_and_hides_the_button_from_the_requester(
    lab, operator, second, admin_user
):
    session = failback_waiting_for_commit(operator)
    approvals.set_rule(admin_user, "commit")
    page = Client()
    page.force_login(operator)
    page.post(f"/sessions/{session.pk}/commit/", {"reason": "CHG-2"})
    request = ApprovalRequest.objects.get(session=session)
    mine = page.get("/approvals/").content.decode()
    assert f"#{request.pk}" in mine and f"Approve #{request.pk}" not in mine and f"Withdraw #{request.pk}" in mine
    other = Client()
    other.force_login(second)
    assert f"Approve #{request.pk}: Commit" in other.get("/approvals/").content.decode()
    other.post(f"/approvals/{request.pk}/approve/", {"reason": "fine"})
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.COMMITTED


def test_the_portals_own_moments_wait_for_a_person_and_run_once_approved(lab, operator, second, admin_user):
    approvals.set_rule(admin_user, "switch")
    session = start(operator, replica_named("app-crm"), switch_mode=SwitchMode.AUTO)
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.READY_TO_SWITCH  # held, not switched
    (request,) = ApprovalRequest.objects.filter(session=session, action="switch")
    assert request.requested_by is None and request.status == Status.PENDING
    (asked,) = rows(session, AuditAction.REQUEST_APPROVAL)
    assert asked.detail.startswith("Automatic switch after phase 1: waiting for a person's approval")
    page = Client()
    page.force_login(second)  # the session page and the API say what waits
    assert f"Automatic switch after phase 1: waiting for approval (request #{request.pk}, asked by the portal" in (
        page.get(f"/sessions/{session.pk}/").content.decode()
    )
    shown = Client().get(f"{API}/sessions/{session.pk}", **bearer(token_for(second))).json()["waiting_for_approval"]
    assert [(w["id"], w["action"], w["requested_by"]) for w in shown] == [(request.pk, "switch", None)]
    approvals.approve(operator, request.pk)  # the portal asked: any Operator may approve
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK
    (switch,) = [r for r in rows(session, AuditAction.SWITCH) if r.outcome == Outcome.OK]
    assert switch.actor is None and switch.data["approved_by"] == operator.username

    approvals.set_rule(admin_user, "commit")
    FailbackSession.objects.filter(pk=session.pk).update(
        commit_policy="auto_commit", commit_after_min=1, policy_due_at=timezone.now() - timedelta(seconds=5)
    )
    for _ in range(2):  # the scheduler, then the watchdog's next round: one request
        assert automatic.commit_policy_due(session.pk) is None
    (policy,) = ApprovalRequest.objects.filter(session=session, action="commit")
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK
    approvals.reject(second, policy.pk, reason="the app owner wants a day more")
    automatic.commit_policy_due(session.pk)
    assert ApprovalRequest.objects.filter(session=session, action="commit").count() == 1  # not asked again
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK


def test_a_request_tells_the_people_who_can_approve_it(lab, operator, admin_user, settings):
    from failback.notifications import config
    from failback.notifications.models import NotificationEndpoint

    from .notify_support import SmtpServer

    session = failback_waiting_for_commit(operator)
    approvals.set_rule(admin_user, "commit")
    config.save_endpoint(
        admin_user,
        NotificationEndpoint(
            name="approvers", kind="email", addresses="leads@example.org", events=["approval_requested"]
        ),
    )
    with SmtpServer() as server:
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", server.port, 5
        with pytest.raises(approvals.ApprovalRequested) as asked:
            workflow.commit(operator, session.pk, reason="CHG-3")
        (mail,) = server.mailbox.messages
    assert mail["event"] == "approval_requested"
    assert f"Approval needed: commit of failback #{session.pk}" in mail["subject"]
    assert f"request #{asked.value.request.pk}" in mail["subject"] and "CHG-3" in mail["body"]


def test_an_administrator_sets_the_rules_through_the_api_and_an_operator_may_not(lab, operator, admin_user):
    admin, other = token_for(admin_user), token_for(operator)

    def post(token, body):
        return Client().post(f"{API}/approvals/rules", body, content_type="application/json", **bearer(token))

    denied = post(other, {"action": "commit"})
    assert denied.status_code == 403 and "Administrator role" in denied.json()["detail"]
    assert post(admin, {"action": "nap"}).status_code == 422
    assert post(admin, {"action": "commit", "plan_id": 999}).status_code == 404
    done = post(admin, {"action": "commit"})
    assert done.status_code == 200 and [(r["action"], r["plan_id"]) for r in done.json()] == [("commit", None)]
    listed = Client().get(f"{API}/approvals/rules", **bearer(other)).json()  # anyone may read them
    assert listed[0]["created_by"] == admin_user.username
    session = failback_waiting_for_commit(operator)
    with pytest.raises(approvals.ApprovalRequested):
        workflow.commit(operator, session.pk)
    assert post(admin, {"action": "commit", "required": False}).json() == []
    assert AuditEvent.objects.filter(action=AuditAction.APPROVAL_RULE, outcome=Outcome.OK).count() == 2
