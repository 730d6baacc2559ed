from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from failback import evidence


class Command(BaseCommand):
    help = (
        "Check a failback's evidence file: its Ed25519 signature and that it is complete and unaltered. "
        "Without --public-key it is checked against this portal's key."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument(
            "--public-key",
            help="the public key to trust (url-safe base64, as shown on the session report); default: this portal's",
        )

    def handle(self, file, public_key, **options):
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {file}: {exc.strerror}") from None
        trusted = public_key or evidence.public_key_b64()
        try:
            doc = evidence.verify(raw, trusted)
        except evidence.Invalid as invalid:
            raise CommandError(f"{file}: NOT VALID: {invalid}") from None
        data = doc["payload"]
        final = "ended" if data["session"]["final"] else "not ended when the file was made"
        self.stdout.write(
            f"{file}: valid. Failback #{data['session']['id']} ({final}), {data['audit']['count']} audit rows, "
            f"{len(data['disks'])} disks, signed by key {doc['signature']['key_id']} as of {data['as_of']}."
        )
