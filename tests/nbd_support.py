"""Real NBD servers for the tests: Debian's nbdkit (``file`` plugin) serving a file over TCP with TLS
on loopback (a CA and a server certificate made here with openssl) or over a Unix socket.

No fake: the engine talks to nbdkit through libnbd exactly as it would to nbdkit's ``vddk`` plugin.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

NBDKIT = shutil.which("nbdkit")


def require_nbd() -> None:
    """Fail (never skip) with what to install when nbdkit or the libnbd binding is missing."""
    missing = []
    if NBDKIT is None:
        missing.append("nbdkit")
    try:
        import nbd  # noqa: F401
    except ImportError:
        missing.append("python3-libnbd (then `sh tests/nbd_venv.sh .venv`)")
    if missing:
        pytest.fail("the nbd tests need " + ", ".join(missing) + ": make test-embedded installs them")


def make_certificates(directory: str) -> str:
    """A CA and a server certificate for 127.0.0.1/localhost, in nbdkit's and libnbd's layout
    (ca-cert.pem, server-cert.pem, server-key.pem). Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, "server-cert.pem")):
        return directory

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=failback test CA",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
    )  # fmt: skip
    with open(os.path.join(directory, "san.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
    )
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
        "-days", "2", "-extfile", "san.cnf", "-out", "server-cert.pem",
    )  # fmt: skip
    os.chmod(os.path.join(directory, "server-key.pem"), 0o600)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NbdServer:
    """One nbdkit serving one file. ``uri`` is what the engine opens."""

    path: str
    readonly: bool
    certs: str | None = None  # TLS over TCP on loopback when set, else a Unix socket
    workdir: str = ""
    port: int = 0
    socket_path: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        if self.certs:
            return f"nbds://127.0.0.1:{self.port}/?tls-certificates={self.certs}"
        return f"nbd+unix:///?socket={self.socket_path}"

    def start(self) -> NbdServer:
        assert NBDKIT is not None
        args = [NBDKIT, "--foreground", "--exit-with-parent"]
        if self.certs:
            self.port = self.port or free_port()
            args += ["--ipaddr", "127.0.0.1", "--port", str(self.port), "--tls=require"]
            args += [f"--tls-certificates={self.certs}"]
        else:
            self.socket_path = self.socket_path or os.path.join(self.workdir, f"nbd-{os.getpid()}-{id(self)}.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            args += ["--unix", self.socket_path]
        if self.readonly:
            args.append("--readonly")
        args += ["file", f"file={self.path}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                if self.certs:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                else:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.socket_path)
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nbdkit did not start listening within 10 s")

    def kill(self) -> None:
        """Take the server away at once (SIGKILL): connections drop mid-request."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        from failback.transfer.nbd import release

        release(self.uri)  # the engine's idle connections: nbdkit waits for its clients before it exits
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@contextlib.contextmanager
def served(path: str, *, readonly: bool, certs: str | None, workdir: str) -> Iterator[NbdServer]:
    server = NbdServer(path, readonly, certs, workdir).start()
    try:
        yield server
    finally:
        server.stop()
