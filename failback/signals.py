"""Who logged in, who failed, who was locked out: into the audit trail (auditors ask for these too).

Authentication is Django's, not ours, so its signals are the one place to hear about it; the rows
are written by the same audit() as every other action. The password is never recorded.
"""

from axes.signals import user_locked_out
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.dispatch import receiver

from .choices import Outcome
from .workflow import audit


def _address(request):
    return request.META.get("REMOTE_ADDR", "") if request is not None else ""


@receiver(user_logged_in)
def logged_in(sender, request, user, **kwargs):
    audit(action="login", actor=user, detail=f"{user.get_username()} logged in from {_address(request)}", data={"ip": _address(request)})


@receiver(user_login_failed)
def login_failed(sender, credentials, request=None, **kwargs):
    name = str(credentials.get("username", ""))[:150]
    user = get_user_model().objects.filter(username=name).first()
    audit(action="login_failed", actor=user, name=name or "(blank)", outcome=Outcome.REFUSED,
          detail=f"Failed login for {name!r} from {_address(request)}", data={"username": name, "ip": _address(request)})


@receiver(user_locked_out)
def locked_out(sender, request, username, ip_address, **kwargs):
    audit(action="login_locked_out", name=str(username)[:150] or "(blank)", outcome=Outcome.REFUSED,
          detail=f"{username!r} locked out from {ip_address} after repeated failures", data={"username": username, "ip": ip_address})
