"""API tokens: issue, revoke and authenticate (the service layer behind the token page, the command and the API).

A token is ``drp_<public id>_<secret>``. Only its SHA-256 is stored, so a stolen database holds no usable
token; the whole token is shown once, when it is issued. Issuing and revoking are audited (never the
secret). Lookups go by hash: the database index compares digests, never the secret itself.
"""

import hashlib
import secrets
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from . import workflow
from .models import ApiToken

PREFIX = "drp_"
NAME_MAX = 100
LAST_USED_RESOLUTION = timedelta(seconds=60)  # last_used_at is written at most once a minute per token


def digest(token):
    return hashlib.sha256(token.encode()).hexdigest()


def issue(actor, user, name, *, via="page"):
    """Create a token for ``user``; returns (ApiToken, the token in clear, to show once)."""
    name = (name or "").strip()
    if not 1 <= len(name) <= NAME_MAX:
        workflow.refuse(
            f"Name the token (1-{NAME_MAX} characters), e.g. after the script that will use it.",
            action="api_token_created",
            actor=actor,
            data={"user": user.get_username()},
        )
    public = secrets.token_hex(4)
    token = f"{PREFIX}{public}_{secrets.token_urlsafe(32)}"
    with transaction.atomic():
        row = ApiToken.objects.create(user=user, name=name, prefix=f"{PREFIX}{public}", key_hash=digest(token))
        workflow.audit(
            action="api_token_created",
            actor=actor,
            detail=f"API token {row.prefix} ({name}) created for {user.get_username()} ({via})",
            data={"token_id": row.pk, "prefix": row.prefix, "name": name, "user": user.get_username(), "via": via},
        )
    return row, token


def revoke(actor, token_id):
    """Revoke one of the actor's own tokens; a revoked token stops working at its next request."""
    with transaction.atomic():
        row = ApiToken.objects.select_for_update().filter(pk=token_id, user=actor).first()
        if row is not None and row.revoked_at is None:
            row.revoked_at = timezone.now()
            row.save(update_fields=["revoked_at"])
            workflow.audit(
                action="api_token_revoked",
                actor=actor,
                detail=f"API token {row.prefix} ({row.name}) revoked",
                data={"token_id": row.pk, "prefix": row.prefix, "name": row.name, "user": actor.get_username()},
            )
            return row
    why = "it is already revoked" if row is not None else "it is not one of your tokens"
    workflow.refuse(
        f"Revoke token refused: {why}.", action="api_token_revoked", actor=actor, data={"token_id": token_id}
    )


def authenticate(token):
    """The active user behind a token, or None (unknown, revoked, or an inactive user)."""
    if not token or not token.startswith(PREFIX) or len(token) > 200:
        return None
    row = ApiToken.objects.select_related("user").filter(key_hash=digest(token), revoked_at__isnull=True).first()
    if row is None or not row.user.is_active:
        return None
    now = timezone.now()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)  # throttled: reads do not all become writes
    user = row.user
    user.api_token = row  # workflow.audit records which token acted (id, name, prefix; never the secret)
    return user
