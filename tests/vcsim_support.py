"""Fixtures for tests against VMware's vCenter simulator (vcsim, govmomi 0.24 from Debian).

``vcsim_binary`` builds ``var/bin/vcsim`` once per session with ``tests/vcsim_build.sh`` (skips the
tests with the reason when that is impossible); ``vcsim`` starts a fresh simulator for one test on a
free port and stops it afterwards; ``vcsim_factory`` starts simulators with other model sizes or
method delays (see the flags in ``tests/vcsim/main.go``); ``fault_proxy`` puts a ``FaultProxy`` between
the portal and the simulator, to break the network on demand (import it into the module that uses it).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
import queue
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "tests" / "vcsim_build.sh"
START_TIMEOUT = 30


@dataclass
class Vcsim:
    """One running simulator: where it listens, how to log in, and where its datastores live."""

    url: str  # https://user:password@127.0.0.1:port/sdk
    host: str
    port: int
    user: str
    password: str
    thumbprint: str  # SHA-256, "AA:BB:..."
    datastores: dict[str, str]  # datastore name -> local directory holding its files
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)

    def hypervisor(self, **kwargs):
        """A VSphereHypervisor logged in to this simulator, pinned to its certificate."""
        from failback.hypervisors.vsphere import VSphereHypervisor

        kwargs.setdefault("thumbprint", self.thumbprint)
        kwargs.setdefault("timeout", 10)
        kwargs.setdefault("user", self.user)
        kwargs.setdefault("password", self.password)
        return VSphereHypervisor(self.host, port=self.port, **kwargs)

    def kill(self) -> None:
        """Stop the simulator at once (SIGKILL), as a crashed or unplugged vCenter would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # vcsim removes its datastore directories on SIGTERM
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stdout:
            self.process.stdout.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture(scope="session")
def vcsim_binary() -> str:
    """Path of the simulator binary; builds it on first use, skips when that is impossible."""
    try:
        done = subprocess.run(["sh", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"vcsim could not be built: {exc}")
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-3:]
        pytest.skip("vcsim could not be built: " + " / ".join(reason))
    path = done.stdout.strip().splitlines()[-1]
    if not os.access(path, os.X_OK):
        pytest.skip(f"vcsim build reported {path!r}, which is not an executable")
    return path


def start_vcsim(binary: str, workdir: Path, *flags: str) -> Vcsim:
    """Start the simulator with ``flags`` (e.g. "-vm", "4"); its datastores go under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "vcsim.log"
    env = dict(os.environ, TMPDIR=str(workdir))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, *flags], stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
            if line.strip() == "ready":
                break
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    url, thumbprint, datastores = "", "", {}
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None or line == "ready":
            break
        if line.startswith("https://"):
            url = line
        elif line.startswith("thumbprint "):
            thumbprint = line.split(" ", 1)[1]
        elif line.startswith("datastore "):
            _, name, path = line.split(" ", 2)
            datastores[name] = path
    if line != "ready" or not url:
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"vcsim did not start within {START_TIMEOUT} s: {log_path.read_text(errors='replace')[-2000:]}"
        )
    parts = urlsplit(url)
    return Vcsim(
        url=url,
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 443,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        thumbprint=thumbprint,
        datastores=datastores,
        process=proc,
        log_path=log_path,
    )


@pytest.fixture
def vcsim_factory(vcsim_binary, tmp_path):
    """Start simulators with chosen flags; all are stopped after the test. Import it into the test
    module that uses it (conftest imports only ``vcsim`` and ``vcsim_binary``)."""
    started: list[Vcsim] = []

    def start(*flags: str) -> Vcsim:
        sim = start_vcsim(vcsim_binary, tmp_path / f"vcsim-{len(started)}", *flags)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def vcsim(vcsim_binary, tmp_path):
    """A fresh default VPX simulator: 1 datacenter, 1 standalone host, 1 cluster of 3 hosts,
    2 VMs per host/cluster (powered on), 1 shared local datastore, 1 distributed port group."""
    sim = start_vcsim(vcsim_binary, tmp_path / "vcsim")
    yield sim
    sim.stop()


# -- network faults between the portal and the simulator -----------------------------------------------

SOAP_METHOD = re.compile(rb"<(?:\w+:)?Body[^>]*>\s*<(?:\w+:)?(\w+)")


def _self_signed(workdir: Path) -> tuple[Path, Path, str]:
    """A throw-away certificate for 127.0.0.1; returns (cert, key, SHA-256 thumbprint)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vcenter-proxy")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "proxy.crt", workdir / "proxy.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return cert_path, key_path, ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


class FaultProxy:
    """A TLS-terminating HTTP proxy between the portal and vcsim that breaks the network on demand.

    It sits where a load balancer in front of vCenter would (the portal pins the proxy's certificate)
    and relays every request to the simulator, recording the SOAP method (or path) of each in
    ``requests``. Faults, each for requests whose method matches (None = any), and with ``after``
    only once a request for that method has been answered:

    - ``fail(n, method, status=503)``: answer the next n requests with that HTTP status, unsent;
    - ``cut(method, n=1)``: send the next n requests on, then drop the connection unanswered (the
      call happened on vCenter, the answer is lost);
    - ``delay(seconds, method)``: hold every answer that long (a slow or hung vCenter);
    - ``outage(seconds, after)``: once ``after`` is answered, go down for that long, then up again;
    - ``down()`` / ``up()``: close the listening port and every open connection (connection
      refused), then listen again on the same port.
    """

    def __init__(self, sim: Vcsim, workdir: Path) -> None:
        import http.server
        import ssl

        workdir.mkdir(parents=True, exist_ok=True)
        self.sim = sim
        cert, key, self.thumbprint = _self_signed(workdir)
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert, key)
        self._upstream_tls = ssl.create_default_context()
        self._upstream_tls.check_hostname = False
        self._upstream_tls.verify_mode = ssl.CERT_NONE  # the simulator's own certificate; the portal pins ours
        self.host, self.port = "127.0.0.1", 0
        self.requests: list[tuple[str, str]] = []  # (method or path, what the proxy did)
        self._faults: list[dict] = []
        self._delays: dict[str | None, tuple[float, str | None]] = {}
        self._outages: list[dict] = []
        self._lock = threading.Lock()
        self._open: set = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                with proxy._lock:
                    proxy._open.add(self.connection)

            def finish(self):
                with proxy._lock:
                    proxy._open.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def relay(self):
                proxy._relay(self)

            do_GET = do_POST = do_PUT = do_HEAD = relay

        self._handler = Handler
        self._server = None
        self.up()

    # -- faults --------------------------------------------------------------------------------------
    def fail(self, n: int, method: str | None = None, status: int = 503, after: str | None = None) -> None:
        with self._lock:
            self._faults.append({"kind": "fail", "left": n, "method": method, "status": status, "after": after})

    def cut(self, method: str | None, n: int = 1, after: str | None = None) -> None:
        with self._lock:
            self._faults.append({"kind": "cut", "left": n, "method": method, "after": after})

    def delay(self, seconds: float, method: str | None = None, after: str | None = None) -> None:
        with self._lock:
            self._delays[method] = (seconds, after)

    def outage(self, seconds: float, after: str) -> None:
        with self._lock:
            self._outages.append({"seconds": seconds, "after": after})

    def _answered(self, method: str) -> bool:
        return any(m == method and o.startswith("relayed") for m, o in self.requests)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()
            self._outages.clear()

    def count(self, method: str, outcome: str | None = None) -> int:
        with self._lock:
            return sum(1 for m, o in self.requests if m == method and (outcome is None or o == outcome))

    def down(self) -> None:
        """Stop listening and drop every open connection: new connections are refused."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        import http.server

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        server = Server((self.host, self.port), self._handler)
        server.socket = self._tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.down()

    # -- relaying ------------------------------------------------------------------------------------
    def _take(self, method: str) -> dict | None:
        with self._lock:
            for fault in self._faults:
                if (
                    fault["left"] > 0
                    and fault["method"] in (None, method)
                    and (fault["after"] is None or self._answered(fault["after"]))
                ):
                    fault["left"] -= 1
                    return fault
        return None

    def _pause_for(self, method: str) -> float:
        with self._lock:
            seconds, after = self._delays.get(method) or self._delays.get(None) or (0, None)
            return seconds if after is None or self._answered(after) else 0

    def _go_down_for(self, seconds: float) -> None:
        self.down()
        time.sleep(seconds)
        self.up()

    def _relay(self, h) -> None:
        import http.client

        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        found = SOAP_METHOD.search(body[:4096]) if body else None
        method = found.group(1).decode() if found else h.path.split("?")[0]
        fault = self._take(method)
        pause = self._pause_for(method)
        if fault is not None and fault["kind"] == "fail":
            with self._lock:
                self.requests.append((method, f"answered {fault['status']}"))
            text = b"injected by the test proxy"
            h.send_response(fault["status"])
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(text)))
            h.end_headers()
            h.wfile.write(text)
            return
        conn = http.client.HTTPSConnection(self.sim.host, self.sim.port, timeout=60, context=self._upstream_tls)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection", "content-length")}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if fault is not None and fault["kind"] == "cut":
            with self._lock:
                self.requests.append((method, "cut"))
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        with self._lock:
            self.requests.append((method, "relayed" if not pause else f"relayed after {pause:g} s"))
        if pause:
            time.sleep(pause)
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        with self._lock:
            due = [o for o in self._outages if o["after"] == method]
            self._outages = [o for o in self._outages if o["after"] != method]
        for o in due:  # the answer is out; now the network goes away
            threading.Thread(target=self._go_down_for, args=(o["seconds"],), daemon=True).start()


@pytest.fixture
def fault_proxy(vcsim, tmp_path):
    """A FaultProxy in front of the test's simulator."""
    proxy = FaultProxy(vcsim, tmp_path / "proxy")
    yield proxy
    proxy.close()
