"""Signed evidence of one failback: a JSON file an auditor can check without trusting the portal's database.

The file is ``{"payload": {...}, "signature": {...}}``. The payload holds who asked for each action and
with what result, the options, the timeline, the predicted against the actual downtime, each disk's
digests on both sides and how they were proven, and every audit row of the session. The signature is
Ed25519 (``settings.FAILBACK_EVIDENCE_KEY``) over the payload's canonical JSON: keys sorted, no spaces,
UTF-8. ``verify`` (and ``manage.py verify_evidence``) checks the signature against the public key the
portal shows, and that the payload is complete: every section present, the audit rows' count and
digest as recorded, each disk's proof consistent.
"""

import base64
import hashlib
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings

from .choices import TERMINAL, AuditAction, Outcome

FORMAT = "drportal-evidence/1"
SECTIONS = ("format", "as_of", "session", "options", "actions", "timeline", "downtime", "disks", "hooks", "audit")
# Operators' decisions: who asked for them is what an auditor looks for first.
DECISIONS = {
    AuditAction.START_FAILBACK,
    AuditAction.SWITCH,
    AuditAction.SCHEDULE_SWITCH,
    AuditAction.COMMIT,
    AuditAction.UNDO,
    AuditAction.CANCEL,
    AuditAction.STOP_COMMIT_POLICY,
}
STAMPS = (
    ("created", "created_at"),
    ("phase1_started", "phase1_started_at"),
    ("phase1_ended", "phase1_ended_at"),
    ("switch_started", "switch_started_at"),
    ("replica_stop_started", "replica_stop_started_at"),
    ("replica_off", "replica_off_at"),
    ("phase2_ended", "phase2_ended_at"),
    ("production_on", "production_on_at"),
    ("ended", "ended_at"),
)


def canonical(payload):
    """The bytes that are signed: the payload as JSON with sorted keys and no spaces, UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(raw):
    return base64.urlsafe_b64encode(raw).decode()


def private_key():
    return Ed25519PrivateKey.from_private_bytes(base64.urlsafe_b64decode(settings.FAILBACK_EVIDENCE_KEY))


def public_key_b64(key=None):
    """The portal's public key (32 url-safe base64 bytes), as shown on every report."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return _b64((key or private_key().public_key()).public_bytes(Encoding.Raw, PublicFormat.Raw))


def fingerprint(public_b64):
    """A short name for a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(base64.urlsafe_b64decode(public_b64)).hexdigest()[:16]


def _at(value):
    return value.isoformat() if value else None


def _row(event):
    return {
        "id": event.pk,
        "at": _at(event.at),
        "actor": event.actor_name,
        "action": event.action,
        "from": event.from_state,
        "to": event.to_state,
        "outcome": event.outcome,
        "detail": event.detail,
        "data": event.data,
    }


def _audit(rows):
    return {"count": len(rows), "sha256": hashlib.sha256(canonical(rows)).hexdigest(), "rows": rows}


def _session(session):
    return {
        "id": session.pk,
        "replica": session.replica.name,
        "workload": session.replica.source_name,
        "platform": session.replica.platform,
        "production_vm": session.vm_name,
        "production_vm_id": session.production_vm_id,
        "target_host": session.target_host,
        "target_datastore": session.target_datastore,
        "status": session.status,
        "final": session.status in TERMINAL,
        "started_by": session.started_by.get_username(),
        "reason": session.reason,
        "plan": session.plan.name if session.plan_id else None,
        "error": session.error,
    }


def _timeline(session):
    stamps = {name: getattr(session, field) for name, field in STAMPS}
    return {
        "stamps": {name: _at(at) for name, at in stamps.items()},
        "phase1_s": _seconds(stamps["phase1_started"], stamps["phase1_ended"]),
        "switch_window_s": session.switch_window.total_seconds() if session.switch_window else None,
        "total_s": _seconds(stamps["created"], stamps["ended"]),
    }


def _seconds(start, end):
    return round((end - start).total_seconds(), 3) if start and end else None


def _downtime(session):
    at_switch = (session.prediction or {}).get("at_switch") or {}
    actual = session.switch_window.total_seconds() if session.switch_window else None
    predicted = at_switch.get("seconds", session.predicted_window_s)
    return {
        "predicted_s": predicted,
        "predicted_parts": at_switch.get("parts") or {},
        "actual_s": actual,
        "error_s": round(actual - predicted, 3) if actual is not None and predicted is not None else None,
        "budget_s": None,  # no downtime budget is set on a session (yet)
        "stop_method": session.stop_method,
    }


def _disks(session, events):
    proofs = {e.data.get("disk"): e.data for e in events if e.action == AuditAction.SEND_CHANGES and e.data}
    return [
        {
            "key": d.key,
            "capacity_bytes": d.capacity_bytes,
            "method": d.method,
            "method_reason": d.method_reason,
            "phase1_bytes_written": d.phase1_bytes_written,
            "phase2_bytes_written": d.phase2_bytes_written,
            "replica_digest": d.source_digest,
            "production_digest": d.target_digest,
            "verified": d.verified,
            "proof": (proofs.get(d.key) or {}).get("proof"),
        }
        for d in session.disks.order_by("key")
    ]


def _actions(events):
    return [
        {
            "action": e.action,
            "requested_by": e.actor_name,
            "approved_by": (e.data or {}).get("approved_by") if isinstance(e.data, dict) else None,
            "at": _at(e.at),
            "outcome": e.outcome,
            "from": e.from_state,
            "to": e.to_state,
            "reason": (e.data or {}).get("reason", "") if isinstance(e.data, dict) else "",
            "detail": e.detail,
        }
        for e in events
        if e.action in DECISIONS
    ]


def _hooks(events):
    """Each hook run: where, which, how it ended, and its output (as bounded by hooks.py)."""
    return [
        {
            "point": e.data.get("point"),
            "hook": e.data.get("hook"),
            "at": _at(e.at),
            "outcome": e.outcome,
            "exit_code": e.data.get("exit_code"),
            "timed_out": e.data.get("timed_out"),
            "seconds": e.data.get("seconds"),
            "output": e.data.get("output", ""),
        }
        for e in events
        if e.action == AuditAction.RUN_HOOK and isinstance(e.data, dict)
    ]


def payload(session):
    """Everything the evidence file states about ``session``, from the database as it is now."""
    events = list(session.events.order_by("at", "id"))
    started = next((e for e in events if e.action == AuditAction.START_FAILBACK and e.outcome == Outcome.OK), None)
    return {
        "format": FORMAT,
        # The last audit row's time, not the clock: the same session gives the same file, so the
        # report's digest matches a file downloaded later (until the session records something new).
        "as_of": _at(events[-1].at if events else session.created_at),
        "session": _session(session),
        "options": started.data if started else {},
        "actions": _actions(events),
        "timeline": _timeline(session),
        "downtime": _downtime(session),
        "disks": _disks(session, events),
        "hooks": _hooks(events),
        "audit": _audit([_row(e) for e in events]),
    }


def sign(data, key=None):
    """The evidence document: ``data`` and its Ed25519 signature."""
    key = key or private_key()
    public = public_key_b64(key.public_key())
    return {
        "payload": data,
        "signature": {
            "algorithm": "Ed25519",
            "public_key": public,
            "key_id": fingerprint(public),
            "value": _b64(key.sign(canonical(data))),
        },
    }


def document(session):
    return sign(payload(session))


def dumps(doc):
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def summary(doc):
    """What the printable report shows of the evidence file."""
    return {
        "sha256": hashlib.sha256(canonical(doc["payload"])).hexdigest(),
        "key_id": doc["signature"]["key_id"],
        "public_key": doc["signature"]["public_key"],
        "audit_rows": doc["payload"]["audit"]["count"],
        "as_of": doc["payload"]["as_of"],
    }


class Invalid(Exception):
    """The evidence file does not hold: the message says the first reason."""


def load(raw):
    """The document in ``raw`` (the file's bytes), refused unless it is exactly as the portal wrote it: a
    changed byte anywhere, even in the layout, is reported, not only one that changes the payload."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Invalid(f"not an evidence file: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"payload", "signature"}:
        raise Invalid("not an evidence file: expected exactly 'payload' and 'signature'")
    if dumps(doc).encode() != raw:
        raise Invalid("the file is not as the portal wrote it: its bytes differ from its content's canonical form")
    return doc


def verify(raw, trusted_public_key=None):
    """Check the evidence file's bytes: its signature (against ``trusted_public_key``, the key the portal
    shows, when given) and its completeness. Returns the document; raises ``Invalid`` with the reason."""
    doc = load(raw)
    sig = doc["signature"]
    if not isinstance(sig, dict) or sig.get("algorithm") != "Ed25519":
        raise Invalid("the signature is not an Ed25519 signature")
    public = trusted_public_key or sig.get("public_key", "")
    if trusted_public_key and sig.get("public_key") != trusted_public_key:
        raise Invalid(f"signed by key {sig.get('key_id')!s}, not by the trusted key {fingerprint(trusted_public_key)}")
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(public))
        key.verify(base64.urlsafe_b64decode(sig.get("value", "")), canonical(doc["payload"]))
    except (InvalidSignature, ValueError, TypeError):
        raise Invalid("the signature does not match the payload: the file was changed after it was signed") from None
    complete(doc["payload"])
    return doc


def complete(data):
    """Raise ``Invalid`` unless every section is there and the parts agree with each other."""
    missing = [s for s in SECTIONS if s not in data]
    if missing:
        raise Invalid(f"incomplete: missing {', '.join(missing)}")
    if data["format"] != FORMAT:
        raise Invalid(f"unknown format {data['format']!r}, expected {FORMAT}")
    audit = data["audit"]
    rows = audit.get("rows") or []
    if audit.get("count") != len(rows) or audit.get("sha256") != hashlib.sha256(canonical(rows)).hexdigest():
        raise Invalid(f"incomplete: {len(rows)} audit rows where {audit.get('count')} were recorded")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids) or [(r["at"], r["id"]) for r in rows] != sorted((r["at"], r["id"]) for r in rows):
        raise Invalid("the audit rows are repeated or out of order")
    if not any(r["action"] == AuditAction.START_FAILBACK and r["outcome"] == Outcome.OK for r in rows):
        raise Invalid("incomplete: the start of the failback is not among the audit rows")
    decided = {(r["action"], r["at"], r["actor"]) for r in rows}
    if any((a["action"], a["at"], a["requested_by"]) not in decided for a in data["actions"]):
        raise Invalid("an action is listed that is not in the audit rows")
    if data["timeline"]["stamps"].get("phase2_ended"):
        for disk in data["disks"]:
            if not disk["verified"] or disk["replica_digest"] != disk["production_digest"]:
                raise Invalid(f"disk {disk['key']} is not proven identical on both sides")
