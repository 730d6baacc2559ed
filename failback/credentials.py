"""Secrets at rest: vCenter passwords are stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256).

Keys come from the environment (FAILBACK_CREDENTIALS_KEYS, comma-separated, newest first, so a key can
be rotated: old tokens still decrypt, new ones use the first key). Nothing here logs or returns a
secret except ``decrypt`` to the code that must hand it to vCenter.
"""

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


class CredentialError(Exception):
    pass


def _fernet():
    return MultiFernet([Fernet(key) for key in settings.FAILBACK_CREDENTIALS_KEYS])


def encrypt(secret: str) -> str:
    return _fernet().encrypt(secret.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise CredentialError(
            "The stored password cannot be decrypted with the configured keys (FAILBACK_CREDENTIALS_KEYS changed?). Enter it again."
        ) from None


def rotate(token: str) -> str:
    """Re-encrypt with the newest key."""
    return _fernet().rotate(token.encode()).decode()
