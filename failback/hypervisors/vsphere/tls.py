"""TLS for every connection to vCenter (SOAP and datastore file transfers alike) — never skipped silently.

- ``thumbprint`` given: the server's certificate must have exactly this SHA-256 thumbprint (checked
  on every handshake); CA and host name are then not consulted. ``fetch_thumbprint()`` shows the
  thumbprint on first contact, for the admin to compare and pin.
- no thumbprint, ``verify=True``: the certificate must chain to the system CA store and match the
  host name.
- no thumbprint, ``verify=False``: refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import ssl

from ..base import HypervisorError


class CertificatePinMismatch(ssl.SSLError):
    """The server presented a certificate whose SHA-256 thumbprint is not the pinned one."""


def _thumbprint_of(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _normalise_thumbprint(value: str) -> str:
    hexed = re.sub(r"[\s:]", "", value).upper()
    if not re.fullmatch(r"[0-9A-F]{64}", hexed):
        raise HypervisorError(
            f"{value!r} is not a SHA-256 thumbprint (32 bytes in hex, e.g. AB:CD:…); "
            "SHA-1 thumbprints are not accepted."
        )
    return ":".join(hexed[i : i + 2] for i in range(0, 64, 2))


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        der = self.getpeercert(binary_form=True)
        pin = self.context.pin  # type: ignore[attr-defined]
        seen = _thumbprint_of(der) if der else "(no certificate)"
        if seen != pin:
            with contextlib.suppress(OSError):
                self.close()
            raise CertificatePinMismatch(
                f"the server's certificate has SHA-256 thumbprint {seen}, not the pinned {pin}"
            )


class _PinnedContext(ssl.SSLContext):
    """Accepts exactly one certificate, by its SHA-256 thumbprint, on every handshake."""

    sslsocket_class = _PinnedSocket
    pin: str


def _tls_context(thumbprint: str | None, verify: bool) -> ssl.SSLContext:
    if thumbprint:
        ctx = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # replaced by the pin check in _PinnedSocket.do_handshake
        ctx.pin = _normalise_thumbprint(thumbprint)
    elif verify:
        ctx = ssl.create_default_context()
    else:
        raise HypervisorError(
            "Refusing to connect without verifying the server's certificate: give its SHA-256 "
            "thumbprint (shown by fetch_thumbprint) or use a certificate the system CA store trusts."
        )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def fetch_thumbprint(host: str, port: int = 443, timeout: float = 10) -> str:
    """SHA-256 thumbprint ("AA:BB:…") of the certificate the server presents, unverified: show it
    to the admin on first contact, who compares it with the one vCenter displays and pins it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise HypervisorError(f"Cannot read the certificate of {host}:{port}: {exc}") from exc
    if not der:
        raise HypervisorError(f"{host}:{port} presented no certificate.")
    return _thumbprint_of(der)
