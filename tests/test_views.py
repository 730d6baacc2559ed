"""Pages: login everywhere, buttons only when legal and allowed, actions through HTTP with CSRF."""

from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from failback.choices import Outcome, SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession

from .helpers import network_map, put_session_in, replica_named, start

pytestmark = pytest.mark.django_db(databases="__all__")


@pytest.fixture
def session(lab, operator):
    return start(operator, replica_named("app-crm"))


def logged_in(user):
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.security
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("failback:replicas", {}),
        ("failback:sessions", {}),
        ("failback:audit", {}),
        ("failback:session", {"pk": 1}),
        ("failback:start", {"pk": 1}),
    ],
)
def test_it_sends_anonymous_visitors_to_the_login_page(db, name, kwargs):
    response = Client().get(reverse(name, kwargs=kwargs))
    assert response.status_code == 302 and response.url.startswith("/accounts/login/")


@pytest.mark.security
def test_it_refuses_anonymous_actions(session):
    response = Client().post(reverse("failback:action", args=[session.pk, "commit"]))
    assert response.status_code == 302 and "/accounts/login/" in response.url
    assert not AuditEvent.objects.filter(action="commit").exists()


def test_it_logs_in_through_the_login_page(operator):
    client = Client()
    response = client.post("/accounts/login/", {"username": "olivia", "password": "olivia-pass-1234"})
    assert response.status_code == 302
    assert client.get(reverse("failback:replicas")).status_code == 200


def test_it_shows_start_failback_to_operators_only(lab, operator, viewer):
    assert "Start failback" in logged_in(operator).get(reverse("failback:replicas")).content.decode()
    page = logged_in(viewer).get(reverse("failback:replicas")).content.decode()
    assert "Start failback" not in page and "Failover" in page


def test_it_starts_a_failback_from_the_form(lab, operator, django_capture_on_commit_callbacks):
    replica = replica_named("app-crm")
    form = {
        "vm_name": "app-crm-01",
        "target_host": "esx-prod-01",
        "target_datastore": "prod-ds-01",
        "switch_mode": SwitchMode.MANUAL,
        "power_on_after": "on",
        "reason": "INC-1",
    }
    form.update(
        {f"net_{nic}": target for nic, target in zip(("nic0", "nic1"), network_map(replica).values(), strict=False)}
    )
    with django_capture_on_commit_callbacks() as queued:
        response = logged_in(operator).post(reverse("failback:start", args=[replica.pk]), form)
    session = FailbackSession.objects.get()
    assert response.status_code == 302 and response.url == reverse("failback:session", args=[session.pk])
    assert (session.vm_name, session.reason, session.started_by) == ("app-crm-01", "INC-1", operator)
    assert len(queued) >= 1  # phase 1 queued for a worker


@pytest.mark.security
def test_it_refuses_a_viewer_posting_the_start_form(lab, viewer):
    replica = replica_named("app-crm")
    form = {
        "vm_name": "x1",
        "target_host": "esx-prod-01",
        "target_datastore": "prod-ds-01",
        "switch_mode": SwitchMode.MANUAL,
    }
    form.update(
        {f"net_{nic}": target for nic, target in zip(("nic0", "nic1"), network_map(replica).values(), strict=False)}
    )
    response = logged_in(viewer).post(reverse("failback:start", args=[replica.pk]), form)
    assert response.status_code == 400 and "Operator role" in response.content.decode()
    assert not FailbackSession.objects.exists()
    assert AuditEvent.objects.get(action="start_failback").outcome == Outcome.REFUSED


def test_it_shows_a_scheduled_switch_without_a_time_as_a_field_error(lab, operator):
    replica = replica_named("app-crm")
    response = logged_in(operator).post(
        reverse("failback:start", args=[replica.pk]),
        {
            "vm_name": "x1",
            "target_host": "esx-prod-01",
            "target_datastore": "prod-ds-01",
            "switch_mode": SwitchMode.SCHEDULED,
        },
    )
    assert response.status_code == 400 and "needs a date and time" in response.content.decode()


@pytest.mark.parametrize(
    "status,shown,hidden",
    [
        (SessionStatus.PHASE1, ["Schedule switch"], ["Switch now", "Commit", "Undo"]),
        (SessionStatus.READY_TO_SWITCH, ["Switch now", "Schedule switch"], ["Commit", "Undo"]),
        (SessionStatus.FAILBACK, ["Commit", "Undo"], ["Switch now", "Schedule switch"]),
        (SessionStatus.COMMITTED, [], ["Switch now", "Schedule switch", "Commit", "Undo"]),
    ],
)
def test_it_shows_only_the_legal_buttons(session, operator, status, shown, hidden):
    put_session_in(session, status)
    page = logged_in(operator).get(reverse("failback:session", args=[session.pk])).content.decode()
    for label in shown:
        assert f">{label}</button>" in page
    for label in hidden:
        assert f">{label}</button>" not in page


def test_it_hides_every_action_from_a_viewer(session, viewer):
    put_session_in(session, SessionStatus.FAILBACK)
    page = logged_in(viewer).get(reverse("failback:session", args=[session.pk])).content.decode()
    assert ">Commit</button>" not in page and ">Undo</button>" not in page


def test_it_states_the_consequence_of_undo_in_the_confirmation(session, operator):
    put_session_in(session, SessionStatus.FAILBACK)
    client = logged_in(operator)
    dialog = client.get(reverse("failback:action", args=[session.pk, "undo"]), HTTP_HX_REQUEST="true").content.decode()
    assert "changes made on the production VM since the switch will be discarded" in dialog
    assert f"The replica {session.replica.name} comes back as it was at the switch" in dialog  # what it keeps
    page = client.get(reverse("failback:action", args=[session.pk, "undo"])).content.decode()  # without JavaScript
    assert "<!doctype html>" in page and "Undo the failback" in page
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK  # a GET only asks


@pytest.mark.security
def test_it_refuses_a_forged_commit_from_a_viewer(session, viewer):
    put_session_in(session, SessionStatus.FAILBACK)
    response = logged_in(viewer).post(reverse("failback:action", args=[session.pk, "commit"]), HTTP_HX_REQUEST="true")
    assert response.status_code == 409 and "Operator role" in response.content.decode()
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK
    assert AuditEvent.objects.filter(action="commit", outcome=Outcome.REFUSED, actor=viewer).exists()


def test_it_answers_an_illegal_action_with_the_refusal(session, operator):
    response = logged_in(operator).post(reverse("failback:action", args=[session.pk, "commit"]), HTTP_HX_REQUEST="true")
    assert response.status_code == 409 and "Commit refused" in response.content.decode()


@pytest.mark.security
def test_it_requires_the_csrf_token(session, operator):
    put_session_in(session, SessionStatus.FAILBACK)
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    response = client.post(reverse("failback:action", args=[session.pk, "undo"]))
    assert response.status_code == 403
    assert FailbackSession.objects.get(pk=session.pk).status == SessionStatus.FAILBACK


def test_it_refuses_other_methods_on_actions_and_unknown_actions(session, operator):
    client = logged_in(operator)
    assert client.put(reverse("failback:action", args=[session.pk, "commit"])).status_code == 405
    assert client.post(reverse("failback:action", args=[session.pk, "explode"])).status_code == 404
    assert client.get(reverse("failback:action", args=[session.pk, "explode"])).status_code == 404


def test_it_schedules_a_switch_from_the_session_page(session, operator):
    when = (timezone.localtime() + timedelta(days=1)).strftime("%Y-%m-%d %H:%M")
    response = logged_in(operator).post(
        reverse("failback:action", args=[session.pk, "schedule"]),
        {"switch_at": when.replace(" ", "T"), "reason": "window"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200 and f"Switch scheduled for {when}" in response.content.decode()
    assert FailbackSession.objects.get(pk=session.pk).switch_mode == SwitchMode.SCHEDULED


def test_it_rejects_a_malformed_switch_time(session, operator):
    response = logged_in(operator).post(
        reverse("failback:action", args=[session.pk, "schedule"]), {"switch_at": "tomorrow-ish"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 400 and "Enter a valid date/time" in response.content.decode()


def test_it_lists_refused_attempts_on_the_audit_page(session, viewer):
    logged_in(viewer).post(reverse("failback:action", args=[session.pk, "undo"]))
    page = logged_in(viewer).get(reverse("failback:audit")).content.decode()
    assert "Refused" in page and "victor" in page


@pytest.mark.security
def test_it_escapes_untrusted_names(lab, operator):
    replica = replica_named("app-crm")
    type(replica).objects.filter(pk=replica.pk).update(source_name="<script>alert(1)</script>")
    page = logged_in(operator).get(reverse("failback:replicas")).content.decode()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_it_shows_the_vms_live_power_state_beside_the_replica_state(lab, operator):
    replica = replica_named("app-crm")
    lab.power_off(replica.vm_id)
    page = logged_in(operator).get(reverse("failback:replicas")).content.decode()
    row = page.split(f'id="replica-{replica.pk}"')[1].split("</tr>")[0]
    assert "Failover" in row and "poweredOff" in row


def start_form(replica, **fields):
    form = {
        "vm_name": "app-crm-01",
        "target_host": "esx-prod-01",
        "target_datastore": "prod-ds-01",
        "switch_mode": SwitchMode.MANUAL,
        "power_on_after": "on",
        **{f"net_{n}": target for n, target in zip(("nic0", "nic1"), network_map(replica).values(), strict=False)},
    }
    return {**form, **fields}


def test_it_reviews_a_start_before_it_starts_and_keeps_the_choices_to_change_them(lab, operator):
    replica = replica_named("app-crm")
    client = logged_in(operator)
    url = reverse("failback:start", args=[replica.pk])
    review = client.post(url, start_form(replica, step="review", reason="CHG-3")).content.decode()
    assert "Review the failback of app-crm-01_replica" in review and not FailbackSession.objects.exists()
    assert 'name="step" value="start"' in review and 'type="hidden" name="reason" value="CHG-3"' in review
    back = client.post(url, start_form(replica, step="edit", reason="CHG-3")).content.decode()
    assert 'name="step" value="review"' in back and 'value="CHG-3"' in back and not FailbackSession.objects.exists()
    response = client.post(url, start_form(replica, step="start", reason="CHG-3"))
    assert response.status_code == 302 and FailbackSession.objects.get().reason == "CHG-3"


def test_it_offers_and_takes_production_hosts_only(lab, operator):
    replica = replica_named("app-crm")
    client = logged_in(operator)
    url = reverse("failback:start", args=[replica.pk])
    page = client.get(url).content.decode()
    assert 'value="esx-prod-01"' in page and 'value="esx-dr-01"' not in page and 'value="esx-dr-02"' not in page
    response = client.post(url, start_form(replica, target_host="esx-dr-01", step="review"))
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    assert not FailbackSession.objects.exists()


def test_the_schedule_dialog_restates_the_time_and_refuses_to_confirm_a_bad_one(session, operator):
    client = logged_in(operator)
    url = reverse("failback:action", args=[session.pk, "schedule"])
    when = timezone.localtime() + timedelta(hours=5)
    dialog = client.get(url, {"switch_at": when.strftime("%Y-%m-%dT%H:%M")}, HTTP_HX_REQUEST="true").content.decode()
    assert f"At {when:%Y-%m-%d %H:%M}" in dialog and "Schedule the switch</button>" in dialog
    assert f'name="switch_at" value="{when:%Y-%m-%dT%H:%M}"' in dialog  # sent on with the confirmation
    bad = client.get(url, {"switch_at": "tomorrow-ish"}, HTTP_HX_REQUEST="true").content.decode()
    assert "Enter a valid date/time" in bad and "Schedule the switch</button>" not in bad
    assert FailbackSession.objects.get(pk=session.pk).switch_mode == SwitchMode.MANUAL
