"""Webhook signatures: HMAC-SHA256 over ``<timestamp>.<body>``, sent with the timestamp.

A receiver recomputes the signature with the shared secret and refuses a timestamp older than a few
minutes, so a captured request cannot be replayed later. No Django here: a receiver can copy it.
"""

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-DR-Portal-Timestamp"
SIGNATURE_HEADER = "X-DR-Portal-Signature"
EVENT_HEADER = "X-DR-Portal-Event"
DELIVERY_HEADER = "X-DR-Portal-Delivery"  # the same on every retry of one delivery: receivers dedupe on it
TOLERANCE_S = 300


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, timestamp: str, signature: str, body: bytes, *, now=None, tolerance_s=TOLERANCE_S) -> bool:
    """True when the signature matches and the timestamp is recent (the receiver's side)."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature or "")
