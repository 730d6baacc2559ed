from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from failback import tokens
from failback.workflow import Refused


class Command(BaseCommand):
    help = (
        "Create an API token for a user (printed once; only its hash is stored). The token acts with the user's role."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--name", default="created with manage.py", help="what the token is for, e.g. the script using it"
        )

    def handle(self, username, name, **options):
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"There is no active user {username!r}.")
        try:
            row, token = tokens.issue(None, user, name, via="manage.py create_api_token")
        except Refused as refused:
            raise CommandError(refused.message) from None
        self.stderr.write(f"API token {row.prefix} ({row.name}) for {username}; shown once, store it now:")
        self.stdout.write(token)
