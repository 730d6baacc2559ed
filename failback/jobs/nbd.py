"""The nbd transport's servers: for a step, one nbdkit per disk and side (the replica's disk read-only,
the production VM's writable), started by the worker, listening on loopback with TLS
(FAILBACK_NBD_TLS_DIR) or on a Unix socket, and stopped when the step ends (``--exit-with-parent``
stops them too if the worker is killed). The platform says what to serve (``hv.nbd_export``: the
``file`` plugin on a disk file, or vSphere's ``vddk``); the engine gets NBD URIs and reaches the disks
through libnbd (failback/transfer/nbd.py).

Each export is named after its session, VM and disk, and the engine takes that name (not the port
or socket) as the target's identity, so a step resumed by another worker, with new servers on new
ports, goes on from the checkpoint into the same disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

from django.conf import settings

from ..choices import Outcome
from ..hypervisors.base import HypervisorError, NbdExport
from ..transfer.nbd import NbdError, release
from .runs import _note

READY_S = 30.0  # nbdkit's vddk plugin logs in to vCenter before it listens
ATTEMPTS = 3  # a step whose NBD server goes away mid-copy starts its servers this many times in all


class NbdkitError(HypervisorError):
    """nbdkit could not be started or did not serve the disk; the message carries nbdkit's own words."""


def command(
    spec: NbdExport,
    *,
    nbdkit: str = "nbdkit",
    unix_socket: str | None = None,
    port: int | None = None,
    tls_dir: str | None = None,
    password_file: str | None = None,
) -> list[str]:
    """The nbdkit command line that serves ``spec`` (pure: the tests check it for the vddk plugin)."""
    args = [nbdkit, "--foreground", "--exit-with-parent"]
    if tls_dir:
        args += ["--ipaddr", "127.0.0.1", "--port", str(port), "--tls=require", f"--tls-certificates={tls_dir}"]
    else:
        args += ["--unix", str(unix_socket)]
    if spec.readonly:
        args.append("--readonly")
    args.append(spec.plugin)
    args += spec.args
    if spec.password is not None:
        if not password_file:
            raise NbdkitError(f"nbdkit's {spec.plugin} plugin needs the password in a file")
        args.append(f"password=+{password_file}")
    return args


def export_name(session_id: int, vm_id: str, disk_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"failback-{session_id}-{vm_id}-{disk_key}")


class Servers:
    """The nbdkit processes of one step; ``serve`` starts one and returns its URI."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="failback-nbd-")  # short: a Unix socket path has 108 bytes
        self.procs: list[subprocess.Popen] = []
        self.uris: list[str] = []
        self.tls_dir = settings.FAILBACK_NBD_TLS_DIR or None
        self.nbdkit = shutil.which(settings.FAILBACK_NBDKIT) or settings.FAILBACK_NBDKIT

    def serve(self, spec: NbdExport, name: str) -> str:
        password_file = None
        if spec.password is not None:
            password_file = os.path.join(self.dir, f"{name}.password")
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(spec.password)
        for _attempt in range(3):  # a free port may be taken between choosing it and nbdkit binding it
            port = _free_port() if self.tls_dir else None
            sock = os.path.join(self.dir, f"{len(self.procs)}.sock")
            args = command(
                spec,
                nbdkit=self.nbdkit,
                unix_socket=sock,
                port=port,
                tls_dir=self.tls_dir,
                password_file=password_file,
            )
            log_path = os.path.join(self.dir, f"{name}.log")
            try:
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
            except FileNotFoundError as exc:
                raise NbdkitError(
                    f"nbdkit is not installed ({self.nbdkit}): the nbd transport needs it (Debian: apt-get install "
                    "nbdkit; vSphere also needs nbdkit's vddk plugin and VMware's VDDK, see README)"
                ) from exc
            self.procs.append(proc)
            if _listening(proc, port, sock):
                if self.tls_dir:
                    uri = f"nbds://127.0.0.1:{port}/{name}?tls-certificates={self.tls_dir}"
                else:
                    uri = f"nbd+unix:///{name}?socket={sock}"
                self.uris.append(uri)
                return uri
            said = _tail(log_path)
            if "Address already in use" not in said:
                break
        raise NbdkitError(f"nbdkit's {spec.plugin} plugin did not serve {name}: {said or 'no message'}")

    def close(self) -> None:
        for uri in self.uris:
            release(uri)  # the engine's idle connections to these servers
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(proc: subprocess.Popen, port: int | None, sock: str) -> bool:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if port is not None:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
            return True
        except OSError:
            time.sleep(0.02)
    proc.kill()
    proc.wait()
    return False


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return " ".join(text[-n:].split())


@contextlib.contextmanager
def disk_ends(hv, session, disks) -> Iterator[dict[str, tuple[str, str]]]:
    """Disk key -> (source, target) for the engine: the replica's and the production VM's disk files
    (direct), or NBD URIs of servers started here for the duration of the block (nbd)."""
    replica_vm, production_vm = session.replica.vm_id, session.production_vm_id
    if hv.transport != "nbd":
        yield {d.key: (hv.disk_path(replica_vm, d.key), hv.disk_path(production_vm, d.key)) for d in disks}
        return
    servers = Servers()
    try:
        ends = {}
        for d in disks:
            src = servers.serve(
                hv.nbd_export(replica_vm, d.key, writable=False), export_name(session.pk, replica_vm, d.key)
            )
            dst = servers.serve(
                hv.nbd_export(production_vm, d.key, writable=True), export_name(session.pk, production_vm, d.key)
            )
            ends[d.key] = (src, dst)
        yield ends
    finally:
        servers.close()


def with_restarts(run, session, step):
    """``step()`` (which opens its servers with :func:`disk_ends` and skips the disks already done), run
    again when an NBD server went away mid-copy (NbdError): the servers start afresh and the engine
    resumes from its checkpoints. Each restart is audited; after ATTEMPTS in all the error stands.
    A server that cannot start at all (NbdkitError) is not retried."""
    attempt = 1
    while True:
        try:
            return step(attempt)
        except NbdError as exc:
            if attempt >= ATTEMPTS:
                raise
            attempt += 1
            _note(
                session,
                "copy_disk",
                f"An NBD server went away mid-copy ({exc}): the servers are started again and the copy resumes "
                f"from its checkpoint (attempt {attempt} of {ATTEMPTS})",
                outcome=Outcome.INFO,
                data={"error": str(exc), "attempt": attempt},
                run=run,
            )
