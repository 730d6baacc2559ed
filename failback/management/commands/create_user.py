import getpass
import warnings

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from failback.apps import ROLES


class Command(BaseCommand):
    help = "Create a user with a role (Viewer, Operator, Administrator)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", required=True, choices=[r.lower() for r in ROLES])
        parser.add_argument("--password", help="read from the terminal when omitted")
        parser.add_argument("--email", default="")

    def handle(self, username, role, password, email, **options):
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            raise CommandError(f"User {username!r} already exists.")
        if not password:
            password = self.ask_password(username)
        user = User(username=username, email=email, is_staff=role == "administrator")
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        user.set_password(password)
        user.save()
        user.groups.add(Group.objects.get(name=role.capitalize()))
        self.stdout.write(self.style.SUCCESS(f"Created {username} ({role.capitalize()})."))

    def ask_password(self, username):
        """The password typed at the terminal. Without one (a script, a pipe, a service) getpass would echo
        what it reads from stdin or die with EOFError: say how to give the password instead."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", getpass.GetPassWarning)  # no terminal: it would echo
                return getpass.getpass(f"Password for {username}: ")
        except (EOFError, getpass.GetPassWarning):
            raise CommandError(
                f"No password for {username}: pass --password, or run the command in a terminal to type it."
            ) from None
