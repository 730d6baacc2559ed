"""Signed evidence of a failback: a real lab failback's file checks out, and any change to it is caught.

The auditor's promise: one file per failback, checkable without the portal's database. The file from a
committed failback verifies (manage.py verify_evidence, the README's one-liner, the API's copy); every
single-byte change is refused (Hypothesis picks the byte and its new value); a file signed by another key,
or re-signed with rows left out, is refused too.
"""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.management import CommandError, call_command
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failback import evidence, workflow
from failback.choices import SessionStatus, SwitchMode
from failback.models import AuditEvent, FailbackSession

from .helpers import replica_named, start
from .test_api import API, bearer, token_for

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True), pytest.mark.beyond]
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.fixture
def committed(lab, operator):
    """A lab failback switched by hand and committed, with a reason on each decision."""
    session = start(operator, replica_named("app-erp"), switch_mode=SwitchMode.MANUAL, reason="CHG-1 fail back")
    workflow.switch_now(operator, session.pk, reason="CHG-1 window")
    workflow.commit(operator, session.pk, reason="CHG-1 keep production")
    session = FailbackSession.objects.get(pk=session.pk)
    assert session.status == SessionStatus.COMMITTED
    return session


def download(session, user):
    client = Client()
    client.force_login(user)
    response = client.get(f"/sessions/{session.pk}/evidence.json")
    assert response.status_code == 200, response.status_code
    assert response["Content-Disposition"] == f'attachment; filename="failback-{session.pk}-evidence.json"'
    return response.content


def test_a_committed_failbacks_evidence_states_who_did_what_and_verifies(committed, operator, viewer, tmp_path):
    raw = download(committed, viewer)  # an auditor with the Viewer role
    doc = evidence.verify(raw, evidence.public_key_b64())
    data = doc["payload"]
    assert data["session"]["final"] and data["session"]["status"] == "committed"
    decisions = [(a["action"], a["requested_by"], a["reason"], a["outcome"]) for a in data["actions"]]
    assert ("switch", operator.username, "CHG-1 window", "ok") in decisions
    assert ("commit", operator.username, "CHG-1 keep production", "ok") in decisions
    assert data["options"]["switch_mode"] == "manual"
    rows = AuditEvent.objects.filter(session=committed).order_by("at", "id")
    assert [r["id"] for r in data["audit"]["rows"]] == [r.pk for r in rows]  # every row of the session, in order
    disks = {d.key: d for d in committed.disks.all()}
    assert {d["key"] for d in data["disks"]} == set(disks)
    for disk in data["disks"]:
        assert (
            disk["verified"] and disk["replica_digest"] == disk["production_digest"] == disks[disk["key"]].target_digest
        )
        assert disk["proof"], disk  # how it was proven: from the switch's audit row
    assert data["downtime"]["actual_s"] == committed.switch_window.total_seconds()
    assert data["timeline"]["stamps"]["ended"] == committed.ended_at.isoformat()

    # The same session gives the same file: the report's digest names what a later download holds.
    assert download(committed, viewer) == raw
    page = Client()
    page.force_login(viewer)
    report = page.get(f"/sessions/{committed.pk}/report/").content.decode()
    assert evidence.summary(doc)["sha256"] in report and evidence.public_key_b64() in report

    path = tmp_path / "evidence.json"
    path.write_bytes(raw)
    out = _command("verify_evidence", str(path))
    assert f"valid. Failback #{committed.pk} (ended), {len(rows)} audit rows" in out

    # The API hands out the same bytes.
    api = Client().get(f"{API}/sessions/{committed.pk}/evidence", **bearer(token_for(viewer)))
    assert api.status_code == 200 and api.content == raw

    # Only for people logged in (or holding a token); the public key is shown to them.
    anonymous = Client().get(f"/sessions/{committed.pk}/evidence.json")
    assert anonymous.status_code == 302 and "/login" in anonymous["Location"]
    assert Client().get(f"{API}/sessions/{committed.pk}/evidence").status_code == 401
    key = page.get("/evidence/public-key").content.decode().strip()
    assert key == evidence.public_key_b64() and len(base64.urlsafe_b64decode(key)) == 32


def _command(*args):
    import io

    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_every_single_byte_change_is_refused(committed, viewer):
    raw = download(committed, viewer)
    trusted = evidence.public_key_b64()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.integers(0, len(raw) - 1), st.integers(1, 255))
    def changed(position, flip):
        altered = bytearray(raw)
        altered[position] ^= flip
        with pytest.raises(evidence.Invalid):
            evidence.verify(bytes(altered), trusted)

    changed()


def test_a_file_signed_by_another_key_or_re_signed_with_rows_left_out_is_refused(committed, viewer, tmp_path):
    doc = evidence.load(download(committed, viewer))
    forger = Ed25519PrivateKey.generate()
    forged = evidence.dumps(evidence.sign(doc["payload"], forger)).encode()
    with pytest.raises(evidence.Invalid, match="not by the trusted key"):
        evidence.verify(forged, evidence.public_key_b64())
    path = tmp_path / "forged.json"
    path.write_bytes(forged)
    with pytest.raises(CommandError, match="NOT VALID: signed by key"):
        _command("verify_evidence", str(path))

    # Even the portal's own key does not make a file with a row left out complete.
    short = json.loads(json.dumps(doc["payload"]))
    short["audit"]["rows"].pop(3)
    with pytest.raises(evidence.Invalid, match="incomplete"):
        evidence.verify(evidence.dumps(evidence.sign(short)).encode(), evidence.public_key_b64())


def test_the_readmes_one_liner_checks_a_file_and_refuses_a_changed_one(committed, viewer, tmp_path):
    command = re.search(r"<!-- evidence one-liner -->\n```sh\n(.*?)\n```", README, re.S)
    assert command, "README.md has no evidence one-liner"
    raw = download(committed, viewer)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_bytes(raw)
    bad.write_bytes(raw.replace(b'"committed"', b'"undone"', 1))
    key = evidence.public_key_b64()

    def run(path):
        script = command.group(1).replace("FILE", str(path)).replace("PUBLIC_KEY", key)
        return subprocess.run(
            ["sh", "-c", script.replace("python3", sys.executable, 1)], capture_output=True, text=True
        )

    ok, refused = run(good), run(bad)
    assert ok.returncode == 0 and "signature OK" in ok.stdout, ok.stderr
    assert refused.returncode != 0 and "InvalidSignature" in refused.stderr
