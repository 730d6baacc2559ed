import getpass

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
        password = password or getpass.getpass(f"Password for {username}: ")
        user = User(username=username, email=email, is_staff=role == "administrator")
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        user.set_password(password)
        user.save()
        user.groups.add(Group.objects.get(name=role.capitalize()))
        self.stdout.write(self.style.SUCCESS(f"Created {username} ({role.capitalize()})."))
