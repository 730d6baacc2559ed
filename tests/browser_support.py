"""Fixtures for the browser tests: a live portal (Daphne + a real qcluster) on the test database, and
Debian's Chromium driven by Playwright's sync API (no browser download: /usr/bin/chromium).

Playwright's sync API keeps an asyncio loop running in the test's thread. Django then refuses ORM calls
there (SynchronousOnlyOperation) and asgiref refuses async_to_sync, which the broadcast uses. So the
browser fixture sets DJANGO_ALLOW_ASYNC_UNSAFE for this process only (never for the servers), and
workflow calls made by a test go through ``off_loop`` (a plain thread) so that their live nudges go out.
"""

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.db import connections

from .conftest import ROOT, make_user, subprocess_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "{}-pass-1234"  # tests.conftest.make_user

# Per document: websocket events seen by htmx's ws extension, and a token that changes on every reload.
INIT_SCRIPT = """
window.__doc = Math.random().toString(36).slice(2);
window.__ws = {open: 0, close: 0, messages: 0, codes: []};
document.addEventListener('htmx:wsOpen', () => window.__ws.open++);
document.addEventListener('htmx:wsClose', (e) => { window.__ws.close++; window.__ws.codes.push(e.detail.event.code); });
document.addEventListener('htmx:wsAfterMessage', () => window.__ws.messages++);
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def off_loop(fn, *args, **kwargs):
    """Call fn in a fresh thread (no event loop there), close its DB connections, return or raise its result."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller
            out["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _tail(path, n=3000):
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Portal:
    """Daphne and a qcluster, each in its own process group, on the test's database, lab and channel layer."""

    env: dict
    log_dir: Path
    port: int = field(default_factory=free_port)
    web: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    users: dict = field(default_factory=dict)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name, argv):
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            return subprocess.Popen(
                argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    def start_web(self, timeout=30):
        self.web = self._spawn(
            "daphne",
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "dr_portal.asgi:application"],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.web.poll() is not None:
                raise RuntimeError(f"Daphne exited with {self.web.returncode}:\n{_tail(self.log_dir / 'daphne.log')}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/accounts/login/")
                status = conn.getresponse().status
                conn.close()
                if status < 500:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"Daphne did not answer on port {self.port} within {timeout} s:\n{_tail(self.log_dir / 'daphne.log')}"
        )

    def start_worker(self):
        self.worker = self._spawn("qcluster", [sys.executable, str(ROOT / "manage.py"), "qcluster"])

    @staticmethod
    def _stop(proc, sig=signal.SIGTERM, grace=8):
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # the group this fixture created for it (start_new_session)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
        # Workers of the group may outlive the leader for a moment; make sure none stays.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_web(self, sig=signal.SIGTERM):
        self._stop(self.web, sig)

    def restart_web(self, between=None, sig=signal.SIGTERM):
        """Stop Daphne, call ``between()`` while it is down, start it again on the same port."""
        self.stop_web(sig)
        if between is not None:
            between()
        self.start_web()

    def stop(self):
        self._stop(self.web)
        # The test is over: the worker goes at once, as test_worker_process kills it (a graceful qcluster
        # stop takes seconds, and whatever it was doing is thrown away with the test database anyway).
        self._stop(self.worker, sig=signal.SIGKILL)

    def logs(self):
        return {name: _tail(self.log_dir / f"{name}.log") for name in ("daphne", "qcluster")}


def server_env(settings):
    env = subprocess_env(settings)
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)  # only this test process needs it (see the module docstring)
    env["DJANGO_ALLOWED_HOSTS"] = "127.0.0.1,localhost"
    env["FAILBACK_SHUTDOWN_TIMEOUT"] = str(settings.FAILBACK_SHUTDOWN_TIMEOUT)
    env["Q_WORKERS"] = "2"
    env["LOG_LEVEL"] = "WARNING"
    return env


@pytest.fixture
def portal(lab, settings, tmp_path, monkeypatch):
    """The seeded small lab, users olivia (Operator) and victor (Viewer), Daphne and a qcluster.

    Use with ``pytest.mark.django_db(databases="__all__", transaction=True)``: the servers are other
    processes, so the data must be committed. Tasks queued by the test go to the broker (the qcluster
    runs them), not inline.
    """
    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "SYNC", False)
    users = {"olivia": make_user("olivia", "Operator"), "victor": make_user("victor", "Viewer")}
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    server = Portal(env=server_env(settings), log_dir=log_dir, users=users)
    try:
        server.start_worker()
        server.start_web()
        yield server
    finally:
        server.stop()
        for name, text in server.logs().items():
            if text.strip():
                print(f"--- {name} (tail) ---\n{text}")


def chromium_missing():
    return not (os.path.exists(CHROMIUM) and shutil.which(CHROMIUM))


@pytest.fixture
def browser(monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extras)")
    if chromium_missing():
        pytest.skip(f"{CHROMIUM} is missing: sh tests/apt.sh chromium")
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
            # Django keeps connections per context (asgiref Local); the ones opened while Playwright ran
            # would outlive the test and keep PostgreSQL from dropping the test database.
            connections.close_all()


def new_page(browser, base_url, *, width=1280, height=900):
    """A page in a fresh context (own cookies) that accepts every confirmation and remembers its text."""
    context = browser.new_context(base_url=base_url, viewport={"width": width, "height": height}, accept_downloads=True)
    context.add_init_script(INIT_SCRIPT)
    page = context.new_page()
    page.dialogs = []
    page.js_errors = []

    def accept(dialog):
        page.dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    return page


@pytest.fixture
def page(browser, portal):
    page = new_page(browser, portal.url)
    try:
        yield page
    finally:
        page.context.close()


def login(page, user):
    """Log in through the login page; ``user`` is a User or a user name (password as make_user sets it)."""
    name = user if isinstance(user, str) else user.get_username()
    page.goto("/accounts/login/")
    page.fill("#id_username", name)
    page.fill("#id_password", PASSWORD.format(name))
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/accounts/login/" not in url)
    return page


def csrf_token(page):
    return next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")


def wait_in_page(page, expression, *, timeout=30_000):
    """Poll a JavaScript expression until it is true. Playwright's wait_for_function builds its predicate
    with eval, which the portal's Content-Security-Policy forbids; page.evaluate is not subject to it."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout / 1000:g} s waiting for {expression}")
        page.wait_for_timeout(100)


# Accessibility: axe-core (shipped inside the axe-playwright-python wheel, no CDN) run in the page.
SERIOUS = ("serious", "critical")


def axe_violations(page, impacts=SERIOUS):
    """Run axe-core on the page as it is now; the violations of the given impacts, one line each
    ("rule (impact): help — selector of each node"), empty when there are none.

    page.evaluate is not subject to the Content-Security-Policy, so the portal's strict policy stays on
    for the check: axe is evaluated as a script, not added as a <script> element."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page, options={"resultTypes": ["violations"]}).response
    assert results["testEngine"]["name"] == "axe-core" and results["url"] == page.url, results.get("url")
    return [
        f"{v['id']} ({v['impact']}): {v['help']} — " + ", ".join(" ".join(n["target"]) for n in v["nodes"][:5])
        for v in results["violations"]
        if v["impact"] in impacts
    ]
