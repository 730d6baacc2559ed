"""vCenter set-up through /api/v1/ alone, against vcsim: register a connection, fetch and pin its
thumbprint, test, sync, and declare a discovered replica's failover; and the refusals (role, password,
thumbprint, input), each answered with the portal's message and written to the audit trail."""

import json

import pytest
from django.test import Client
from django.urls import reverse
from django_q.models import Schedule

from failback import connections
from failback.choices import Outcome, ReplicaState
from failback.models import AuditEvent, Replica, VCenterConnection

from .test_api import Api, token_for

pytestmark = [pytest.mark.vcsim, pytest.mark.api, pytest.mark.django_db(databases="__all__", transaction=True)]

WRONG_PIN = ":".join(["AB"] * 32)


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def replica_vm(vcsim):
    """On the vCenter side (not the portal's): a powered-on VM named like a replica of web-01."""
    hv = vcsim.hypervisor()
    source = next(vm for vm in hv.inventory().vms if vm.name == "DC0_H0_VM0")
    vm_id = hv.create_vm_like(
        source.vm_id,
        name="web-01_replica",
        host="DC0_H0",
        datastore="LocalDS_0",
        network_map={"DC0_DVPG0": "DC0_DVPG0"},
    )
    hv.power_on(vm_id)
    hv.close()
    return vm_id


def body_for(vcsim, **overrides):
    return {
        "name": "vc-dr",
        "host": vcsim.host,
        "port": vcsim.port,
        "username": vcsim.user,
        "password": vcsim.password,
        **overrides,
    }


def rows(action, **filters):
    return list(AuditEvent.objects.filter(action=action, **filters).order_by("id"))


def test_it_sets_up_a_vcenter_from_nothing_to_a_declared_failover(vcsim, replica_vm, admin_user, operator):
    admin, ops = Api(token_for(admin_user)), Api(token_for(operator))
    assert admin.get("/connections").json()["count"] == 0

    # Register with CA verification: vcsim's certificate is self-signed, so the save cannot log in yet.
    created = admin.post("/connections", body_for(vcsim, sync_minutes=5))
    assert created.status_code == 201, created.content
    conn = created.json()
    assert conn["tls_mode"] == "ca" and not conn["sync_scheduled"]
    assert conn["sync_error"].startswith("Not verified when saved (Failed: ") and "is not trusted" in conn["sync_error"]
    assert "password" not in conn and vcsim.password not in created.content.decode()
    stored = VCenterConnection.objects.get(pk=conn["id"])
    assert vcsim.password not in stored.password_encrypted and stored.reveal_password() == vcsim.password
    path = f"/connections/{conn['id']}"

    fetched = admin.post(f"{path}/thumbprint")
    assert fetched.status_code == 200, fetched.content
    assert fetched.json() == {"host": vcsim.host, "port": vcsim.port, "thumbprint": vcsim.thumbprint, "pinned": False}

    pinned = admin.post(f"{path}/pin", {"thumbprint": vcsim.thumbprint.lower()})
    assert pinned.status_code == 200, pinned.content
    conn = pinned.json()
    assert (conn["tls_mode"], conn["thumbprint"], conn["sync_scheduled"]) == ("thumbprint", vcsim.thumbprint, True)
    assert conn["sync_error"] == "" and conn["last_test_result"] == ""  # the Test connection button's fields
    assert Schedule.objects.get(name=f"vcenter-sync-{conn['id']}").minutes == 5
    assert admin.post(f"{path}/thumbprint").json()["pinned"] is True

    tested = admin.post(f"{path}/test")
    assert tested.status_code == 200 and tested.json()["ok"] is True
    assert tested.json()["result"].startswith("Connected: ")

    synced = admin.post(f"{path}/sync")  # django-q2 runs the task inline in tests
    assert synced.status_code == 202, synced.content
    conn = admin.get(path).json()
    assert conn["synced_at"] and conn["sync_error"] == "" and conn["inventory"]["vms"] >= 1
    assert len(conn["replica_ids"]) == 1
    replica = ops.get(f"/replicas/{conn['replica_ids'][0]}").json()
    assert (replica["name"], replica["source_name"], replica["state"]) == ("web-01_replica", "web-01", "ready")
    assert replica["vm_id"] == replica_vm and replica["platform"] == "vsphere"

    declared = ops.post(f"/replicas/{replica['id']}/declare-failover", {"reason": "site A lost"})
    assert declared.status_code == 200, declared.content
    assert declared.json()["state"] == "failover" and declared.json()["can_start_failback"] is True
    assert ops.post(f"/replicas/{replica['id']}/declare-failover", {}).status_code == 409  # once

    trail = [
        (e.action, e.outcome, e.actor_name)
        for e in AuditEvent.objects.exclude(action="api_token_created").order_by("id")
    ]
    assert trail[:6] == [
        ("create_connection", Outcome.OK, "ada"),
        ("fetch_thumbprint", Outcome.OK, "ada"),
        ("update_connection", Outcome.OK, "ada"),
        ("fetch_thumbprint", Outcome.OK, "ada"),
        ("test_connection", Outcome.OK, "ada"),
        ("sync_inventory", Outcome.INFO, "ada"),
    ]
    assert ("sync_inventory", Outcome.OK, "system") in trail
    assert trail[-2:] == [("declare_failover", Outcome.OK, "olivia"), ("declare_failover", Outcome.REFUSED, "olivia")]
    assert (
        "not verified" in rows("create_connection")[0].detail and "Connected: " in rows("update_connection")[0].detail
    )
    everything = json.dumps(list(AuditEvent.objects.values("detail", "data")), default=str)
    assert vcsim.password not in everything


def test_it_refuses_the_wrong_roles_and_audits_them(vcsim, replica_vm, admin_user, operator, viewer):
    conn = connections.save_connection(
        admin_user,
        VCenterConnection(
            name="vc", host=vcsim.host, port=vcsim.port, username=vcsim.user, tls_mode="thumbprint",
            thumbprint=vcsim.thumbprint,
        ),
        password=vcsim.password,
    )  # fmt: skip
    connections.sync_inventory(conn.pk)
    replica = Replica.objects.get(name="web-01_replica")
    for user in (operator, viewer):
        api = Api(token_for(user))
        for path in ("/connections", f"/connections/{conn.pk}"):
            response = api.get(path)
            assert response.status_code == 403 and "Administrator role is needed" in response.json()["detail"]
        for path, body, action in (
            ("/connections", body_for(vcsim, name="vc-2"), "create_connection"),
            (f"/connections/{conn.pk}", {"host": "vc.example.test"}, "update_connection"),
            (f"/connections/{conn.pk}/thumbprint", None, "fetch_thumbprint"),
            (f"/connections/{conn.pk}/pin", {"thumbprint": vcsim.thumbprint}, "update_connection"),
            (f"/connections/{conn.pk}/test", None, "test_connection"),
            (f"/connections/{conn.pk}/sync", None, "sync_inventory"),
            (f"/connections/{conn.pk}/pair", {"vm_id": "vm-1", "source_name": "x"}, "pair_replica"),
        ):
            before = AuditEvent.objects.count()
            response = api.patch(path, body) if path == f"/connections/{conn.pk}" else api.post(path, body)
            detail = response.json()["detail"]
            assert response.status_code == 403, (path, detail)
            assert detail == f"{user.username} may not manage vCenter connections: the Administrator role is needed."
            assert AuditEvent.objects.count() == before + 1
            refusal = AuditEvent.objects.order_by("-id").first()
            assert (refusal.action, refusal.outcome, refusal.actor, refusal.detail) == (
                action,
                Outcome.REFUSED,
                user,
                detail,
            )
    assert VCenterConnection.objects.get().host == vcsim.host and VCenterConnection.objects.count() == 1
    response = Api(token_for(viewer)).post(f"/replicas/{replica.pk}/declare-failover", {"reason": "x"})
    assert response.status_code == 403 and "the Operator role is needed" in response.json()["detail"]
    assert Replica.objects.get(pk=replica.pk).state == ReplicaState.READY
    assert rows("declare_failover", outcome=Outcome.REFUSED, actor=viewer)


def test_it_refuses_a_wrong_password_at_save_time(vcsim, admin_user):
    api = Api(token_for(admin_user))
    pinned = {"tls_mode": "thumbprint", "thumbprint": vcsim.thumbprint}
    response = api.post("/connections", body_for(vcsim, password="not-the-password", **pinned))
    assert response.status_code == 409, response.content
    detail = response.json()["detail"]
    assert "refused the login" in detail and "not saved" in detail and "not-the-password" not in detail
    assert not VCenterConnection.objects.exists() and not Schedule.objects.filter(name__startswith="vcenter-sync")
    assert rows("create_connection")[-1].outcome == Outcome.REFUSED and rows("create_connection")[-1].detail == detail

    conn = api.post("/connections", body_for(vcsim, **pinned)).json()
    assert conn["sync_scheduled"] and conn["sync_error"] == ""
    response = api.patch(f"/connections/{conn['id']}", {"password": "changed-by-mistake"})
    assert response.status_code == 409 and "refused the login" in response.json()["detail"]
    assert VCenterConnection.objects.get().reveal_password() == vcsim.password  # the stored one is kept

    # The password changed on the vCenter side later: the scheduled sync stops trying instead of failing every few minutes.
    stored = VCenterConnection.objects.get()
    stored.set_password("rotated-elsewhere")
    stored.save()
    assert connections.sync_inventory(stored.pk) == 0
    conn = api.get(f"/connections/{stored.pk}").json()
    assert (
        not conn["sync_scheduled"] and "the scheduled sync starts once Test connection succeeds" in conn["sync_error"]
    )
    assert "refused the login" in conn["sync_error"]
    assert api.patch(f"/connections/{stored.pk}", {"password": vcsim.password}).json()["sync_scheduled"] is True


def test_it_refuses_a_thumbprint_the_server_does_not_present(vcsim, admin_user):
    api = Api(token_for(admin_user))
    response = api.post("/connections", body_for(vcsim, tls_mode="thumbprint", thumbprint=WRONG_PIN))
    assert response.status_code == 409, response.content
    detail = response.json()["detail"]
    assert f"presents the SHA-256 thumbprint {vcsim.thumbprint}, not the pinned {WRONG_PIN}" in detail
    assert not VCenterConnection.objects.exists()
    conn = api.post("/connections", body_for(vcsim)).json()  # CA mode: saved, unverified
    response = api.post(f"/connections/{conn['id']}/pin", {"thumbprint": WRONG_PIN})
    assert response.status_code == 409 and "not the pinned" in response.json()["detail"]
    assert VCenterConnection.objects.get().tls_mode == "ca"
    assert [e.outcome for e in rows("update_connection")] == [Outcome.REFUSED]


def test_it_answers_bad_input_with_the_field_and_why(vcsim, admin_user):
    api = Api(token_for(admin_user))
    api.post("/connections", body_for(vcsim))
    cases = [
        (body_for(vcsim, name="vc-2", port=70000), "port", "less than or equal to 65535"),
        (body_for(vcsim, name="vc-2", thumbprint="12:34"), "thumbprint", ""),
        (body_for(vcsim, name="vc-2", host="vc example"), "host", ""),
        (body_for(vcsim, name="vc-2", datastore_paths={"ds-01": "relative/path"}), "datastore_paths.ds-01", ""),
        ({k: v for k, v in body_for(vcsim, name="vc-2").items() if k != "password"}, "password", "Field required"),
        (body_for(vcsim), "name", "already exists"),  # the page's form says so: the same rule
        (body_for(vcsim, name="vc-2", tls_mode="thumbprint"), None, "Pinning needs the server's SHA-256 thumbprint"),
    ]
    for body, field, message in cases:
        before = AuditEvent.objects.count()
        response = api.post("/connections", body)
        problem = response.json()["detail"]
        if field is None:  # the service's rule: a conflict, in its words
            assert response.status_code == 409 and message in problem
        else:
            assert response.status_code == 422, (field, problem)
            assert [".".join(str(p) for p in e["loc"] if p != "body") for e in problem] == [field], problem
            assert message in " ".join(e["msg"] for e in problem), problem
        refusal = AuditEvent.objects.order_by("-id").first()
        assert AuditEvent.objects.count() == before + 1 and refusal.action == "create_connection"
        assert refusal.outcome == Outcome.REFUSED and vcsim.password not in refusal.detail
    assert VCenterConnection.objects.count() == 1
    assert api.post("/connections/999999/test").status_code == 404
    response = api.post("/connections/1/pin", {"thumbprint": "nope"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "thumbprint"


def test_it_refuses_the_same_on_the_connection_page(vcsim, admin_user):
    """The page and the API share the service: a wrong password is refused there too, and pinning works."""
    page = Client()
    page.force_login(admin_user)
    form = {
        "name": "vc-page",
        "host": vcsim.host,
        "port": vcsim.port,
        "username": vcsim.user,
        "password": "wrong-one",
        "tls_mode": "thumbprint",
        "thumbprint": vcsim.thumbprint,
        "transport": "direct",
        "replica_suffix": "_replica",
        "sync_minutes": 15,
    }
    response = page.post(reverse("failback:connection_new"), form)
    html = response.content.decode()
    assert response.status_code == 400 and "refused the login" in html and "not saved" in html
    assert not VCenterConnection.objects.exists()

    response = page.post(
        reverse("failback:connection_new"), {**form, "password": vcsim.password, "tls_mode": "ca", "thumbprint": ""}
    )
    conn = VCenterConnection.objects.get()
    assert response.status_code == 302 and not connections.sync_scheduled(conn)
    shown = page.get(reverse("failback:connection", args=[conn.pk])).content.decode()
    assert "Not verified when saved" in shown and "none until Test connection succeeds" in shown
    page.post(reverse("failback:connection_action", args=[conn.pk, "test"]))
    assert not connections.sync_scheduled(conn)  # the certificate is still not trusted: the test failed

    response = page.post(reverse("failback:connection_action", args=[conn.pk, "pin"]), {"thumbprint": WRONG_PIN})
    assert "not the pinned" in page.get(response.url).content.decode()
    assert VCenterConnection.objects.get().tls_mode == "ca"
    response = page.post(reverse("failback:connection_action", args=[conn.pk, "pin"]), {"thumbprint": vcsim.thumbprint})
    shown = page.get(response.url).content.decode()
    assert f"Thumbprint {vcsim.thumbprint} pinned" in shown and "every 15 min" in shown
    assert connections.sync_scheduled(conn) and VCenterConnection.objects.get().sync_error == ""
