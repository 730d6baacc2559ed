"""Who logged in, who failed, who was locked out: into the audit trail (auditors ask for these too); and
the open websockets of a login that ended are closed.

Authentication is Django's, not ours, so its signals are the one place to hear about it; the rows
are written by the same audit() as every other action. The password is never recorded.
"""

from axes.signals import user_locked_out
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models.signals import post_save
from django.dispatch import receiver

from . import logins
from .broadcast import close_sockets, login_group, user_group
from .choices import Outcome
from .workflow import audit


def _address(request):
    return request.META.get("REMOTE_ADDR", "") if request is not None else ""


@receiver(user_logged_in)
def logged_in(sender, request, user, **kwargs):
    audit(
        action="login",
        actor=user,
        detail=f"{user.get_username()} logged in from {_address(request)}",
        data={"ip": _address(request)},
    )


@receiver(user_login_failed)
def login_failed(sender, credentials, request=None, **kwargs):
    name, address = str(credentials.get("username", ""))[:150], _address(request)
    count, row = logins.row_to_write("login_failed", address)
    if row == "each":
        user = get_user_model().objects.filter(username=name).first()
        audit(
            action="login_failed",
            actor=user,
            name=name or "(blank)",
            outcome=Outcome.REFUSED,
            detail=f"Failed login for {name!r} from {address}",
            data={"username": name, "ip": address},
        )
    elif row == "summary":
        _summary("login_failed", address, count, f"{count} failed logins from {address}", name)


@receiver(user_locked_out)
def locked_out(sender, request, username, ip_address, **kwargs):
    count, row = logins.row_to_write("login_locked_out", ip_address)
    if row == "each":
        audit(
            action="login_locked_out",
            name=str(username)[:150] or "(blank)",
            outcome=Outcome.REFUSED,
            detail=f"{username!r} locked out from {ip_address} after repeated failures",
            data={"username": username, "ip": ip_address},
        )
    elif row == "summary":
        _summary(
            "login_locked_out",
            ip_address,
            count,
            f"{count} attempts from {ip_address} refused while locked out",
            username,
        )


def _summary(action, address, count, what, last_name):
    """One row for many: how many there were from the address in this window (the rows for each stopped earlier)."""
    window_min = settings.LOGIN_AUDIT_WINDOW_S // 60
    audit(
        action=action,
        name="(many)",
        outcome=Outcome.REFUSED,
        detail=f"{what} within {window_min} min (rows for each one stop after the first {settings.LOGIN_AUDIT_ROWS_PER_ADDRESS}); "
        f"the latest for {str(last_name)[:150]!r}",
        data={
            "ip": address,
            "count": count,
            "summary": True,
            "window_min": window_min,
            "last_username": str(last_name)[:150],
        },
    )


# -- open websockets follow the login: closed when it ends, not only refused on reconnect ----------------


@receiver(user_logged_out)
def logged_out(sender, request, user, **kwargs):
    """This login's sockets (the other browsers' logins of the same user stay open)."""
    session_key = getattr(
        getattr(request, "session", None), "session_key", None
    )  # still there: flushed after the signal
    if session_key:
        close_sockets(login_group(session_key))


@receiver(post_save, sender=get_user_model())
def user_saved(sender, instance, **kwargs):
    if not instance.is_active:  # deactivated: every socket of theirs, whatever login opened it
        close_sockets(user_group(instance.pk))
