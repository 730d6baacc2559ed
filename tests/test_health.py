"""/healthz and /readyz: answered without a login, revealing nothing; /readyz follows the database, the
channel layer, the broker and the watchdog.

The outage test runs a portal (Daphne and a qcluster, as an operator would) on a PostgreSQL cluster and a
Redis server of its own, started for it in a temporary folder on free ports, and stops and starts them (and
kills the portal's workers): the shared servers of the production-profile run are never stopped.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import timedelta
from glob import glob
from pathlib import Path

import pytest
from django.test import Client
from django.utils import timezone

from failback.checks import record_scheduler_clock
from failback.models import SchedulerClock

ROOT = Path(__file__).resolve().parent.parent
BOTH = ["default", "channels"]  # the embedded channel layer lives in its own SQLite database


def _databases():
    return BOTH if not os.environ.get("REDIS_URL") else ["default"]


# -- in-process: the answers themselves ----------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases=_databases())
def test_it_says_alive_to_anyone_and_nothing_more():
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}
    assert "no-cache" in response["Cache-Control"]
    assert Client().post("/healthz").status_code == 405


@pytest.mark.django_db(transaction=True, databases=_databases())
def test_it_answers_probes_in_plain_http_behind_tls(settings):
    """With DJANGO_HTTPS every page redirects to https, but a probe from the node itself or the proxy still
    gets its answer."""
    settings.SECURE_SSL_REDIRECT = True
    client = Client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)
    assert client.get("/metrics").status_code == 403  # answered (refused), not redirected
    assert client.get("/accounts/login/").status_code == 301


@pytest.mark.django_db(transaction=True, databases=_databases())
def test_it_is_unready_until_the_watchdog_has_run_and_again_when_it_goes_silent(settings):
    settings.REDIS_URL = ""  # the worker check reads the watchdog's row only (a cluster's Stat is the live test's)
    client = Client()
    first = client.get("/readyz")
    assert first.status_code == 503
    assert first.json() == {
        "status": "unready",
        "checks": {
            "database": "ok",
            "channel_layer": "ok",
            "broker": "ok",
            "worker_and_scheduler": "never seen",
        },
    }
    record_scheduler_clock()  # what the watchdog task writes each minute
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.content
    assert ready.json()["status"] == "ready"
    # The watchdog's last run grows older than the limit: a worker or the scheduler is gone.
    SchedulerClock.objects.update(
        db_time=timezone.now() - timedelta(seconds=settings.FAILBACK_READY_WORKER_SECONDS + 30)
    )
    silent = client.get("/readyz")
    assert silent.status_code == 503
    assert silent.json()["checks"]["worker_and_scheduler"].startswith("silent for ")


@pytest.mark.django_db(transaction=True, databases=_databases())
def test_it_answers_without_a_login_and_shows_no_configuration(settings):
    """Not the settings' secrets, hosts, ports or database names, nor a version or a traceback."""
    record_scheduler_clock()
    body = Client().get("/readyz").content.decode()
    for secret in (settings.SECRET_KEY, *settings.FAILBACK_CREDENTIALS_KEYS):
        assert secret not in body
    for revealing in ("127.0.0.1", "6379", "5432", "sqlite", "postgres", "redis", "Traceback", "version"):
        assert revealing not in body.lower()
    assert set(json.loads(body)) == {"status", "checks"}


# -- a live portal on servers of its own, stopped and started -------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(args):
    """initdb and postgres refuse to run as root: run them as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class Postgres:
    """A throwaway PostgreSQL cluster: initdb in a temporary folder, on a free loopback port, trust auth."""

    def __init__(self, folder):
        self.bin = Path(sorted(glob("/usr/lib/postgresql/*/bin/initdb"))[-1]).parent
        self.folder, self.port = folder, _free_port()
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres")
        subprocess.run(
            _as_postgres(
                [str(self.bin / "initdb"), "-D", f"{folder}/data", "-U", "postgres", "-A", "trust", "--no-sync"]
            ),
            check=True,
            capture_output=True,
        )
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def start(self):
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin / "pg_ctl"),
                    "-D",
                    f"{self.folder}/data",
                    "-l",
                    f"{self.folder}/log",
                    "-o",
                    options,
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self):
        subprocess.run(
            _as_postgres([str(self.bin / "pg_ctl"), "-D", f"{self.folder}/data", "-m", "immediate", "-w", "stop"]),
            check=True,
            capture_output=True,
        )


class Redis:
    """A throwaway redis-server on a free loopback port, without persistence."""

    def __init__(self, folder):
        self.folder, self.port, self.proc = folder, _free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.folder,
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait(lambda: _connects(self.port), "redis-server to listen")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _connects(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Portal:
    """Daphne and a qcluster, as deploy/ starts them, on the given database and Redis."""

    def __init__(self, folder, database_url, redis_url):
        self.folder, self.port, self.procs = folder, _free_port(), []
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"},
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DR_PORTAL_VAR": f"{folder}/var",
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "dr_portal.settings",
            "PYTHONPATH": str(ROOT),
        }

    def manage(self, *args):
        subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, check=True, capture_output=True)

    def spawn(self, name, args):
        with open(f"{self.folder}/{name}.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def start(self):
        self.manage("migrate", "--noinput")
        self.start_cluster()
        web = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "dr_portal.asgi:application"]
        self.spawn("daphne", web)
        _wait(lambda: _connects(self.port), "Daphne to listen")
        # The watchdog's task, queued through the broker and run by the cluster's worker, as the scheduler
        # does every minute (its first round comes only 30 s after the cluster starts).
        self.manage("shell", "-c", "from django_q.tasks import async_task; async_task('failback.tasks.watchdog')")

    def start_cluster(self):
        self.spawn("qcluster", [sys.executable, "manage.py", "qcluster"])
        self.cluster = self.procs[-1]

    def kill_cluster(self):
        os.killpg(self.cluster.pid, signal.SIGKILL)  # the node's whole cluster: sentinel, pusher, workers
        self.cluster.wait(10)

    def ready(self, expected):
        """Wait until /readyz answers ``expected`` (200 or 503); the last answer."""
        answers = []

        def answered():
            answers.append(_get(self.port, "/readyz"))
            return answers[-1][0] == expected

        try:
            _wait(answered, f"/readyz to answer {expected}")
        except AssertionError:
            raise AssertionError(f"last answer {answers[-1] if answers else None}:\n{self.logs()}") from None
        return answers[-1][1]

    def logs(self):
        return "\n".join(
            f"--- {name}\n" + Path(f"{self.folder}/{name}.log").read_text(errors="replace")[-3000:]
            for name in ("daphne", "qcluster")
            if Path(f"{self.folder}/{name}.log").exists()
        )

    def stop(self):
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


@pytest.fixture
def own_services():
    # PostgreSQL's and Redis's binaries, installed (through tests/apt.sh) as the production profile's run
    # installs them: a bare `apt-get install postgresql` here would leave the shared cluster without the
    # loopback trust line that services.sh adds only when it installs PostgreSQL itself. Then our own servers.
    subprocess.run(["sh", str(ROOT / "tests/services.sh")], check=True, capture_output=True)
    folder = tempfile.mkdtemp(prefix="dr-readyz-")
    os.chmod(folder, 0o755)
    started = []
    try:
        for sub in ("pg", "redis"):
            os.mkdir(f"{folder}/{sub}")
        postgres, redis = Postgres(f"{folder}/pg"), Redis(f"{folder}/redis")
        postgres.start()
        started.append(postgres)
        redis.start()
        started.append(redis)
        portal = Portal(folder, postgres.url, redis.url)
        started.append(portal)
        portal.start()
        yield postgres, redis, portal
    finally:
        for service in reversed(started):
            try:
                service.stop()
            except subprocess.CalledProcessError:
                pass  # already stopped by the test
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.process
@pytest.mark.faults
def test_it_turns_unready_when_postgresql_redis_or_the_workers_stop_and_ready_when_back(own_services):
    postgres, redis, portal = own_services
    assert portal.ready(200) == {
        "status": "ready",
        "checks": {"database": "ok", "channel_layer": "ok", "broker": "ok", "worker_and_scheduler": "ok"},
    }

    postgres.stop()
    down = portal.ready(503)
    assert down["checks"]["database"] == "unreachable"
    assert down["checks"]["channel_layer"] == "ok"  # Redis still carries messages
    assert _get(portal.port, "/healthz") == (200, {"status": "alive"})  # alive all the same: no restart for it
    postgres.start()
    assert portal.ready(200)["status"] == "ready"

    redis.stop()
    down = portal.ready(503)
    assert down["checks"]["channel_layer"] == "unreachable"
    assert down["checks"]["broker"] == "unreachable"
    assert down["checks"]["database"] == "ok"
    assert _get(portal.port, "/healthz") == (200, {"status": "alive"})
    redis.start()
    back = portal.ready(200)
    assert back["checks"] == {"database": "ok", "channel_layer": "ok", "broker": "ok", "worker_and_scheduler": "ok"}

    # The node's workers die: their cluster's status expires from Redis within seconds, long before the
    # watchdog's row grows old.
    portal.kill_cluster()
    assert portal.ready(503)["checks"]["worker_and_scheduler"] == "no cluster running"
    portal.start_cluster()
    assert portal.ready(200)["status"] == "ready"
