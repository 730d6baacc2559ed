"""Hooks: commands the worker runs at a failback's steps (stop an application, drain a load balancer,
change DNS, hand the VM back to replication).

The commands come from an allow-list file that the machine's administrator keeps
(``FAILBACK_HOOKS_FILE``, TOML), never from text typed in the page or the API: a failback names the
hooks it wants at each point, and the names must be in that file. Each entry says the command (an argv
list, run without a shell), its timeout, whether a failure fails the step or the failback continues,
and, optionally, the replicas it applies to by default::

    [hooks.drain-web]
    command = ["/usr/local/sbin/drain", "--pool", "web"]
    timeout_s = 60
    on_error = "fail"              # or "continue"
    default_points = ["before_switch"]
    replicas = ["web-*"]           # glob patterns of replica names that get it by default

The command gets the session's facts in ``DRPORTAL_*`` environment variables (and nothing else from
the worker's environment: no secrets), runs in its own process group, and is killed with it at the
timeout. Its output (the first and last 4 KiB) goes to the audit trail with the exit code.
"""

import fnmatch
import os
import signal
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from django.conf import settings

POINTS = {
    "before_phase1": "before phase 1",
    "before_switch": "before the switch (the replica still runs)",
    "after_switch": "after the switch (production powered on)",
    "after_commit": "after commit",
    "after_undo": "after undo",
}
# Where a failing "fail" hook can still stop what follows; after these points the step already happened.
STOPPING_POINTS = {"before_phase1", "before_switch"}
OUTPUT_KEPT = 4096  # bytes from the start and from the end of a hook's output
TIMEOUT_MAX_S = 3600


class HookConfigError(ValueError):
    """The allow-list file cannot be read or says something impossible."""


class HookFailed(Exception):
    """A hook whose failure fails the step."""


@dataclass(frozen=True)
class Hook:
    name: str
    command: tuple
    timeout_s: int = 60
    on_error: str = "fail"
    default_points: tuple = ()
    replicas: tuple = ()
    env: dict = field(default_factory=dict)


def _hook(name, entry):
    command = entry.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) and a for a in command):
        raise HookConfigError(f"hook {name}: 'command' must be a non-empty list of strings (argv, no shell)")
    if not os.path.isabs(command[0]):
        raise HookConfigError(f"hook {name}: the command must be an absolute path, not {command[0]!r}")
    timeout = entry.get("timeout_s", 60)
    if not isinstance(timeout, int) or not 1 <= timeout <= TIMEOUT_MAX_S:
        raise HookConfigError(f"hook {name}: timeout_s must be a whole number of seconds from 1 to {TIMEOUT_MAX_S}")
    if entry.get("on_error", "fail") not in ("fail", "continue"):
        raise HookConfigError(f"hook {name}: on_error must be 'fail' or 'continue'")
    points = tuple(entry.get("default_points", ()))
    if set(points) - set(POINTS):
        raise HookConfigError(f"hook {name}: unknown points {sorted(set(points) - set(POINTS))}; known: {list(POINTS)}")
    return Hook(
        name,
        tuple(command),
        timeout,
        entry.get("on_error", "fail"),
        points,
        tuple(entry.get("replicas", ())),
        {str(k): str(v) for k, v in (entry.get("env") or {}).items()},
    )


@lru_cache(maxsize=4)
def _load(path, mtime):
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise HookConfigError(f"the hooks file {path} cannot be read: {exc}") from None
    return {name: _hook(name, entry) for name, entry in (data.get("hooks") or {}).items()}


def allowed():
    """The allow-list: name -> Hook, from FAILBACK_HOOKS_FILE (re-read when the file changes)."""
    path = settings.FAILBACK_HOOKS_FILE
    if not path or not os.path.exists(path):
        return {}
    return _load(path, os.stat(path).st_mtime_ns)


def choose(replica_name, requested=None):
    """The hooks a failback of ``replica_name`` runs: ``requested`` ({point: [names]}) when given, else the
    file's defaults for that replica. Raises ValueError with the reason for an unknown point or name."""
    hooks = allowed()
    if requested is None:
        chosen = {}
        for hook in hooks.values():
            if any(fnmatch.fnmatchcase(replica_name, p) for p in hook.replicas):
                for point in hook.default_points:
                    chosen.setdefault(point, []).append(hook.name)
        return chosen
    if not isinstance(requested, dict):
        raise ValueError("hooks must map a point to a list of hook names")
    for point, names in requested.items():
        if point not in POINTS:
            raise ValueError(f"unknown hook point {point!r}; the points are {', '.join(POINTS)}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"hooks at {point} must be a list of hook names")
        unknown = [n for n in names if n not in hooks]
        if unknown:
            raise ValueError(f"hook {unknown[0]!r} is not in the allow-list ({settings.FAILBACK_HOOKS_FILE or 'none'})")
    return {point: list(names) for point, names in requested.items() if names}


def facts(session, point):
    """The environment a hook runs with: the session's facts and a plain PATH, nothing of the worker's."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "DRPORTAL_POINT": point,
        "DRPORTAL_SESSION_ID": str(session.pk),
        "DRPORTAL_STATUS": session.status,
        "DRPORTAL_PLATFORM": session.replica.platform,
        "DRPORTAL_REPLICA": session.replica.name,
        "DRPORTAL_REPLICA_VM_ID": session.replica.vm_id,
        "DRPORTAL_WORKLOAD": session.replica.source_name,
        "DRPORTAL_PRODUCTION_VM": session.vm_name,
        "DRPORTAL_PRODUCTION_VM_ID": session.production_vm_id or "",
        "DRPORTAL_TARGET_HOST": session.target_host,
        "DRPORTAL_STARTED_BY": session.started_by.get_username(),
        "DRPORTAL_PLAN": session.plan.name if session.plan_id else "",
    }


@dataclass
class Outcome:
    exit_code: int | None
    timed_out: bool
    seconds: float
    output: str
    error: str = ""

    @property
    def ok(self):
        return self.exit_code == 0 and not self.timed_out and not self.error


def execute(hook, env):
    """Run one hook: its own process group, killed whole at the timeout; output kept at both ends."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                hook.command, env={**env, **hook.env}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/",
            )  # fmt: skip
        except OSError as exc:
            return Outcome(None, False, time.monotonic() - started, "", f"could not start: {exc.strerror}")
        try:
            code, timed_out = proc.wait(timeout=hook.timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code, timed_out = proc.wait(), True
        return Outcome(code, timed_out, time.monotonic() - started, _kept(out))


def _kept(out):
    size = out.seek(0, os.SEEK_END)
    out.seek(0)
    if size <= 2 * OUTPUT_KEPT:
        return out.read().decode("utf-8", "replace")
    head = out.read(OUTPUT_KEPT)
    out.seek(size - OUTPUT_KEPT)
    skipped = size - 2 * OUTPUT_KEPT
    return f"{head.decode('utf-8', 'replace')}\n[… {skipped} bytes left out …]\n{out.read().decode('utf-8', 'replace')}"


def describe(hook, point, result):
    """The audit row's text and data for one hook run."""
    if result.error:
        how = result.error
    elif result.timed_out:
        how = f"timed out after {hook.timeout_s} s and was killed"
    else:
        how = f"exited {result.exit_code}"
    then = ""
    if not result.ok:
        stops = hook.on_error == "fail" and point in STOPPING_POINTS
        then = "; the step fails" if stops else "; the failback continues"
    data = {
        "point": point,
        "hook": hook.name,
        "command": list(hook.command),
        "exit_code": result.exit_code,
        "timed_out": result.timed_out,
        "seconds": round(result.seconds, 3),
        "on_error": hook.on_error,
        "output": result.output,
    }
    return f"Hook {hook.name} ({POINTS[point]}) {how} in {result.seconds:.1f} s{then}", data
