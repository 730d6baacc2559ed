"""Fixtures for tests against VMware's vCenter simulator (vcsim, govmomi 0.24 from Debian).

``vcsim_binary`` builds ``var/bin/vcsim`` once per session with ``tests/vcsim_build.sh`` (skips the
tests with the reason when that is impossible); ``vcsim`` starts a fresh simulator for one test on a
free port and stops it afterwards; ``vcsim_factory`` starts simulators with other model sizes or
method delays (see the flags in ``tests/vcsim/main.go``).
"""

from __future__ import annotations

import os
import queue
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
        raise RuntimeError(f"vcsim did not start within {START_TIMEOUT} s: {log_path.read_text(errors='replace')[-2000:]}")
    parts = urlsplit(url)
    return Vcsim(
        url=url, host=parts.hostname or "127.0.0.1", port=parts.port or 443,
        user=unquote(parts.username or ""), password=unquote(parts.password or ""),
        thumbprint=thumbprint, datastores=datastores, process=proc, log_path=log_path,
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
