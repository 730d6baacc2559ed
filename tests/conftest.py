import inspect
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from asgiref.sync import SyncToAsync
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.db import connections
from django_q.conf import Conf

from failback.hypervisors.lab import LabHypervisor

from .vcsim_support import vcsim, vcsim_binary  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def lab_dirs(settings, tmp_path):
    settings.LAB_ROOT = tmp_path / "lab"
    settings.FAILBACK_STATE_DIR = tmp_path / "sessions"
    settings.FAILBACK_PROGRESS_INTERVAL = 0.05
    settings.FAILBACK_SHUTDOWN_TIMEOUT = 5


@pytest.fixture(autouse=True)
def fresh_cache(settings):
    """Each test its own in-memory cache: it holds counters (failed logins per address, failback/logins.py) that must
    not carry from one test into the next, nor reach the Redis that other runs share in the production profile."""
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": f"test-{uuid.uuid4().hex}"}
    }


@pytest.fixture(autouse=True)
def async_thread_connections_closed(request):
    """After an async test, close the database connections of the thread its ``sync_to_async`` calls ran
    in (asgiref's one shared thread outside any ``async_to_sync``). Left open, the last such test on a
    worker kept a connection to the PostgreSQL test database, which then could not be dropped."""
    yield
    if inspect.iscoroutinefunction(request.function):
        SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture(autouse=True)
def tasks_run_inline(monkeypatch):
    """Unit tests run django-q2 tasks inline (its documented sync mode); process tests start a real qcluster."""
    monkeypatch.setattr(Conf, "SYNC", True)


def make_user(name, role):
    user = User.objects.create_user(name, password=f"{name}-pass-1234")
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def operator(db):
    return make_user("olivia", "Operator")


@pytest.fixture
def viewer(db):
    return make_user("victor", "Viewer")


@pytest.fixture
def admin_user(db):
    return make_user("ada", "Administrator")


@pytest.fixture
def lab(db, settings):
    """A small real lab (sparse files under tmp) with its replicas imported, all in Failover."""
    call_command("seed_lab", "--count", "4", "--scale", "0.02", "--no-user", stdout=open(os.devnull, "w"))
    return LabHypervisor(settings.LAB_ROOT)


def subprocess_env(settings):
    """Environment for a real process sharing this test's databases, lab and state directories."""
    env = dict(os.environ)
    db = connections["default"].settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
        env["CHANNELS_DB_PATH"] = str(connections["channels"].settings_dict["NAME"])
    else:
        env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env["LAB_ROOT"] = str(settings.LAB_ROOT)
    env["FAILBACK_STATE_DIR"] = str(settings.FAILBACK_STATE_DIR)
    env["FAILBACK_PROGRESS_INTERVAL"] = str(settings.FAILBACK_PROGRESS_INTERVAL)
    env["FAILBACK_HEARTBEAT_SECONDS"] = "0.5"  # tests shorten the stall limit to 2 s
    env["DJANGO_SETTINGS_MODULE"] = "dr_portal.settings"
    env["PYTHONPATH"] = str(ROOT)
    return env


def wait_for(predicate, timeout=60, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_cluster(settings, log=os.devnull, **env):
    """A real qcluster in its own process group (a test kills or pauses it and its workers at once),
    its output appended to ``log``. The test runs the watchdog itself where it needs one."""
    environ = subprocess_env(settings)
    environ.update({"LOG_LEVEL": "WARNING", **{k: str(v) for k, v in env.items()}})
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "qcluster"],
            env=environ,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_cluster(proc):
    """SIGKILL the whole process group (woken first, in case a test paused it)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
    proc.wait(10)


@pytest.fixture
def qcluster(settings):
    """A real django-q2 cluster process on this test's database."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "qcluster"],
        env=subprocess_env(settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    yield proc
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    print(out.decode(errors="replace")[-4000:])
