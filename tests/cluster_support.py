"""The production profile as a small cluster on this machine, started from the files in deploy/.

nginx (Debian's) on loopback with a self-signed certificate, in front of Daphne web nodes, django-q2 worker
nodes and the shared PostgreSQL and Redis. Each node is its own process group with its own environment
(its own var/ directory), as on its own machine; the lab and the transfer state are shared, as a datastore
and the shared FAILBACK_STATE_DIR are. The deploy files are used as written, with only their ports and paths
replaced: the environment file gives every node its variables and each unit's ExecStart its command.

Used by tests/test_cluster.py and bench/site_failback.py. Nothing here stands in for project code: the
cluster is driven through the proxy (the API with a token, the login form, websockets) and read back
through the API, the database and the lab's files.
"""

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/dr_portal"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/5"
PASSWORD = "cluster-pass-1234"
TERMINAL = {"Committed", "Undone", "Failed", "Cancelled"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=60, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_env_file(path):
    """KEY=VALUE lines as systemd's EnvironmentFile reads them (comments and blank lines skipped)."""
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def unit_entries(text):
    """The [Service] entries of a unit file the test reads: ExecStart, WorkingDirectory, EnvironmentFile."""
    entries = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("ExecStart", "WorkingDirectory", "EnvironmentFile"):
            entries[key.strip()] = value.strip()
    return entries


def own_database_url(base, suffix):
    """A database of its own beside the one ``base`` names (same server, user)."""
    url = urlsplit(base)
    return urlunsplit(url._replace(path=f"/{url.path.strip('/') or 'dr_portal'}_{suffix}"))


def recreate_database(url):
    parts = urlsplit(url)
    name = parts.path.strip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(url):
    parts = urlsplit(url)
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parts.path.strip("/")}" WITH (FORCE)')


@dataclass
class Node:
    name: str
    kind: str  # web | worker | proxy | watchdog
    command: list
    env: dict
    cwd: Path
    log: Path
    port: int | None = None
    proc: subprocess.Popen | None = None

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a node is lost as a whole
            )
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pids(self):
        """Every process of the node's group (the node and the processes it forked)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getpgid(int(entry)) == self.proc.pid:
                        found.append(int(entry))
                except ProcessLookupError:
                    pass
        return found

    def kill(self, sig=signal.SIGKILL):
        """Lose the node: the signal to its whole process group (kill -9 -PGID)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(15)


@dataclass
class Cluster:
    workdir: Path
    database_url: str
    redis_url: str | None
    web_nodes: int = 2
    worker_nodes: int = 3
    proxy: bool = True
    settings: dict = field(default_factory=dict)  # extra environment for every node
    nodes: list = field(default_factory=list)
    port: int = 0
    token: str = ""

    # -- set-up ----------------------------------------------------------------------------------
    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.shared = self.workdir / "shared"
        for sub in ("shared/lab", "shared/sessions", "etc", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.lab_root = self.shared / "lab"
        self.port = free_port() if self.proxy else 0
        self.web_ports = [free_port() for _ in range(self.web_nodes)]
        self.host = f"localhost:{self.port}" if self.proxy else f"127.0.0.1:{self.web_ports[0]}"
        self.base = f"https://{self.host}" if self.proxy else f"http://{self.host}"

    def substitutions(self):
        """The only things the deploy files are templated for: ports and paths."""
        subs = {
            "/opt/dr-portal/.venv/bin/python": sys.executable,
            "/opt/dr-portal": str(ROOT),
            "/etc/dr-portal/dr-portal.env": str(self.workdir / "etc" / "dr-portal.env"),
            "/var/lib/dr-portal": str(self.workdir / "var"),
            "/srv/dr-portal": str(self.shared),
            "/etc/ssl/dr-portal/fullchain.pem": str(self.workdir / "etc" / "cert.pem"),
            "/etc/ssl/dr-portal/privkey.pem": str(self.workdir / "etc" / "key.pem"),
            "listen 80;": f"listen 127.0.0.1:{free_port()};",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{self.port} ssl http2;",
            "portal.example.com": "localhost",
        }
        for i, port in enumerate(self.web_ports):
            subs[f"127.0.0.1:{8001 + i}"] = f"127.0.0.1:{port}"
        return subs

    def template(self, text, *, required=()):
        for old, new in self.substitutions().items():
            text = text.replace(old, new)
        for old in required:
            assert old not in text, f"{old} left in a templated deploy file"
        return text

    def write_configs(self):
        """The deploy files, templated, under workdir/etc: the env file, both units, nginx's site and main config."""
        etc = self.workdir / "etc"
        env = read_env_file(DEPLOY / "dr-portal.env")
        env.update(self.node_settings())
        (etc / "dr-portal.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        for unit in ("dr-portal-web@.service", "dr-portal-worker.service"):
            (etc / unit).write_text(self.template((DEPLOY / "systemd" / unit).read_text()))
        if self.proxy:
            self.make_certificate()
            site = (DEPLOY / "nginx" / "dr-portal.conf").read_text()
            if not Path("/proc/net/if_inet6").exists():  # no IPv6 here: the [::] listeners cannot bind
                site = "\n".join(line for line in site.splitlines() if "listen [::]:" not in line)
            site = site.replace("listen [::]:80;", f"listen [::1]:{free_port()};")
            site = site.replace("listen [::]:443 ssl http2;", f"listen [::1]:{self.port} ssl http2;")
            (etc / "dr-portal.conf").write_text(self.template(site))
            (etc / "nginx.conf").write_text(self.nginx_main())
        return etc

    def node_settings(self):
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url or "",  # blank: the embedded profile (SQLite channel layer, ORM broker)
            **({} if self.redis_url else {"CHANNELS_DB_PATH": str(self.shared / "channels.sqlite3")}),
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "FAILBACK_CREDENTIALS_KEYS": _fernet_key(),
            "DJANGO_HTTPS": "true" if self.proxy else "false",
            "DJANGO_ALLOWED_HOSTS": "localhost,127.0.0.1",
            "DJANGO_CSRF_TRUSTED_ORIGINS": self.base,
            "DR_PORTAL_VAR": str(self.workdir / "var"),
            "FAILBACK_STATE_DIR": str(self.shared / "sessions"),
            "LAB_ROOT": str(self.lab_root),
            "Q_WORKERS": "1",
            "LOG_LEVEL": "WARNING",
            **self.settings,
        }

    def nginx_main(self):
        tmp = self.workdir / "nginx"
        tmp.mkdir(exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""  # its workers read the temp dirs under workdir
        temps = "".join(
            f"  {kind}_temp_path {tmp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return (
            f"{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {self.workdir}/logs/nginx-error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n  access_log {self.workdir}/logs/nginx-access.log;\n{temps}"
            f"  include {self.workdir}/etc/dr-portal.conf;\n}}\n"
        )

    def make_certificate(self):
        etc = self.workdir / "etc"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            + ["-keyout", str(etc / "key.pem"), "-out", str(etc / "cert.pem"), "-days", "2", "-subj", "/CN=localhost"]
            + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
        self.ca = str(etc / "cert.pem")

    def nginx_test(self):
        """`nginx -t` on the templated configuration: (returncode, output)."""
        done = subprocess.run(
            ["nginx", "-t", "-c", str(self.workdir / "etc" / "nginx.conf")], capture_output=True, text=True
        )
        return done.returncode, done.stderr + done.stdout

    def environment(self, name):
        """A node's own environment: the env file (as systemd reads it) over a clean base, its own var/."""
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ")}
        env.update(read_env_file(self.workdir / "etc" / "dr-portal.env"))
        env["DR_PORTAL_VAR"] = str(self.workdir / "var" / name)
        env["PYTHONPATH"] = str(ROOT)
        env["DJANGO_SETTINGS_MODULE"] = "dr_portal.settings"
        return env

    def manage(self, *args, check=True):
        done = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            env=self.environment("admin"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed: {done.stderr[-3000:]}")
        return done.stdout

    def prepare(self, *, seed_count=4, seed_scale=0.02):
        """A fresh database and Redis db, migrated, with a seeded lab, an Operator and her API token."""
        if self.database_url.startswith("postgres"):
            recreate_database(self.database_url)
        if self.redis_url:
            redis.Redis.from_url(self.redis_url).flushdb()
        self.write_configs()
        self.manage("migrate", "--noinput")
        if not self.redis_url:  # the embedded profile: the channel layer's own SQLite file, shared by the nodes
            self.manage("migrate", "--database", "channels", "--noinput")
        self.manage("seed_lab", "--count", str(seed_count), "--scale", str(seed_scale), "--no-user")
        self.manage("create_user", "olivia", "--role", "operator", "--password", PASSWORD)
        out = self.manage("create_api_token", "olivia", "--name", "cluster")
        self.token = out.strip()

    # -- nodes -----------------------------------------------------------------------------------
    def unit_command(self, unit, instance=""):
        entries = unit_entries((self.workdir / "etc" / unit).read_text())
        assert entries["EnvironmentFile"] == str(self.workdir / "etc" / "dr-portal.env")
        return shlex.split(entries["ExecStart"].replace("%i", instance)), Path(entries["WorkingDirectory"])

    def add_node(self, name, kind, command, cwd, port=None):
        node = Node(name, kind, command, self.environment(name), cwd, self.workdir / "logs" / f"{name}.log", port)
        Path(node.env["DR_PORTAL_VAR"]).mkdir(parents=True, exist_ok=True)
        self.nodes.append(node)
        return node.start()

    def start(self):
        for i, port in enumerate(self.web_ports):
            command, cwd = self.unit_command("dr-portal-web@.service", str(port))
            self.add_node(f"web{i + 1}", "web", command, cwd, port)
        for i in range(self.worker_nodes):
            command, cwd = self.unit_command("dr-portal-worker.service")
            self.add_node(f"worker{i + 1}", "worker", command, cwd)
        if self.proxy:
            conf = str(self.workdir / "etc" / "nginx.conf")
            self.add_node("proxy", "proxy", ["nginx", "-c", conf, "-g", "daemon off;"], self.workdir)
        for node in self.web:
            wait_for(lambda n=node: _listening(n.port), timeout=60, what=f"{node.name} listening")
        wait_for(
            lambda: self.get("/accounts/login/").status_code == 200, timeout=30, what="the login page via the proxy"
        )
        return self

    def start_watchdog(self, every=1.0):
        """The watchdog's function (the one the failback-watchdog schedule runs each minute) run every second,
        so a test sees a lost step resumed within seconds of the stall limit rather than within a minute."""
        code = (
            "import time, django\ndjango.setup()\nfrom failback.watchdog import recover_stalled\n"
            f"while True:\n    recover_stalled()\n    time.sleep({every})\n"
        )
        return self.add_node("watchdog", "watchdog", [sys.executable, "-c", code], ROOT)

    @property
    def web(self):
        return [n for n in self.nodes if n.kind == "web"]

    @property
    def workers(self):
        return [n for n in self.nodes if n.kind == "worker"]

    def restart(self, node):
        """What systemd's Restart= does for a lost node."""
        return node.start()

    def stop(self):
        for node in reversed(self.nodes):
            if node.alive():
                node.kill(signal.SIGKILL)

    def worker_holding(self, session_id):
        """The worker node whose process holds the session's disk lock (the one running its step), or None."""
        lock = str(self.shared / "sessions" / str(session_id) / ".lock")
        for node in self.workers:
            if not node.alive():
                continue
            for pid in node.pids():
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == lock:
                            return node
                    except OSError:
                        pass
        return None

    def rss_bytes(self, node):
        """Resident memory of a node's whole process group now."""
        total = 0
        for pid in node.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            total += int(found.group(1)) * 1024 if found else 0
        return total

    def logs(self, tail=3000):
        out = []
        for path in sorted((self.workdir / "logs").glob("*.log")):
            text = path.read_text(errors="replace")
            if text.strip():
                out.append(f"--- {path.name}\n{text[-tail:]}")
        return "\n".join(out)

    # -- through the proxy -------------------------------------------------------------------------
    def http(self):
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override the certificate given here
        s.verify = getattr(self, "ca", True)
        return s

    def get(self, path, **kw):
        return self.http().get(self.base + path, timeout=30, **kw)

    def api(self, method, path, json=None, expect=(200, 201, 202)):
        answer = self.http().request(
            method,
            f"{self.base}/api/v1{path}",
            json=json,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
        )
        assert answer.status_code in expect, f"{method} {path}: {answer.status_code} {answer.text[:500]}"
        return answer.json()

    def login(self, username="olivia", password=PASSWORD):
        """Log in through the proxy with the login form (CSRF and all); returns the session cookie."""
        s = self.http()
        page = s.get(f"{self.base}/accounts/login/", timeout=30)
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        done = s.post(
            f"{self.base}/accounts/login/",
            data={"username": username, "password": password, "csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{self.base}/accounts/login/", "Origin": self.base},
            allow_redirects=False,
            timeout=30,
        )
        assert done.status_code == 302, f"login through the proxy: {done.status_code} {done.text[:300]}"
        return s.cookies["sessionid"]

    def start_failback(self, replica_id, **options):
        targets = self.api("GET", f"/replicas/{replica_id}/targets")
        replica = self.api("GET", f"/replicas/{replica_id}")
        body = {
            "vm_name": f"{replica['source_name']}-prod",
            "target_host": "esx-prod-01",
            "target_datastore": "prod-ds-01",
            "network_map": targets["suggested_network_map"],
            "switch_mode": "manual",
            "power_on_after": True,
            **options,
        }
        return self.api("POST", f"/replicas/{replica_id}/failback", body)

    def session(self, session_id):
        return self.api("GET", f"/sessions/{session_id}")

    def wait_status(self, session_id, *statuses, timeout=90):
        return wait_for(
            lambda: (s := self.session(session_id))["status"] in statuses and s,
            timeout=timeout,
            interval=0.3,
            what=f"session {session_id} in {statuses}",
        )

    def audit(self, session_id):
        rows, offset = [], 0
        while True:
            page = self.api("GET", f"/audit?session={session_id}&limit=500&offset={offset}")
            rows += page["items"]
            offset += len(page["items"])
            if offset >= page["count"] or not page["items"]:
                return rows

    def sql(self, query, *args):
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(query, args).fetchall()

    def ssl_context(self):
        return ssl.create_default_context(cafile=self.ca) if self.proxy else None

    def ws_url(self, path):
        return f"{'wss' if self.proxy else 'ws'}://{self.host}{path}"


class Watcher(threading.Thread):
    """A websocket client on a live page that reconnects, as htmx's ws extension does, whenever its
    connection drops. Records (time, connection number, status label, percent) of every frame."""

    def __init__(self, cluster, path, cookie, *, until=TERMINAL):
        super().__init__(daemon=True)
        self.url, self.until = cluster.ws_url(path), until
        self.headers = {"Cookie": f"sessionid={cookie}", "Origin": cluster.base}
        self.ssl = cluster.ssl_context()
        self.frames, self.connections, self.errors = [], 0, []
        self.stopping = threading.Event()

    def run(self):
        from websockets.sync.client import connect

        while not self.stopping.is_set():
            try:
                with connect(self.url, additional_headers=self.headers, ssl=self.ssl, open_timeout=5) as ws:
                    self.connections += 1
                    while not self.stopping.is_set():
                        try:
                            message = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        self.frames.append((time.monotonic(), self.connections, *parse_frame(message)))
                        if self.frames[-1][2] in self.until:
                            self.stopping.set()
            except Exception as exc:  # the node went away, or the proxy had no node for a moment: reconnect
                self.errors.append(repr(exc))
                time.sleep(0.3)

    def status(self):
        return self.frames[-1][2] if self.frames else None

    def stop(self):
        self.stopping.set()
        self.join(10)


def parse_frame(html):
    status = re.search(r'id="session-status">([^<]*)<', html)
    percents = [int(p) for p in re.findall(r'<progress max="100" value="(\d+)"', html)]
    return (status.group(1).strip() if status else None), (min(percents) if percents else None)


def _listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _fernet_key():
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def nginx_available():
    return shutil.which("nginx") is not None
