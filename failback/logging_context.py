"""Log lines that say which failback they belong to, and JSON lines when LOG_FORMAT=json asks for them.

A step of a failback (phase 1, the switch, a catch-up, commit, undo, cancel, power-on, a plan's switch)
runs inside ``step(...)``: the session's id and the step's name go into a context variable, and the
``SessionFilter`` on the log handlers copies them onto every record logged while the step runs, by the
project's code or by a library's, in the step's own thread and in the threads it starts with
``copy_context`` (the disks sent side by side). A contextvar rather than a thread-local: a django-q2
worker runs one task after another in the same thread, and ``step`` resets the variable when it ends,
so a line logged by the next task never carries the last one's id.
"""

import contextvars
import functools
import json
import logging
import time
from contextlib import contextmanager
from datetime import UTC, datetime

_context: contextvars.ContextVar[dict | None] = contextvars.ContextVar("failback_log_context", default=None)

log = logging.getLogger("failback.steps")


def current():
    """The ids bound to this context: {"session_id": 7, "step": "phase1"}, or {}."""
    return dict(_context.get() or {})


@contextmanager
def bound(**ids):
    """Bind ``ids`` (session_id, plan_id, step) to every log line of this context until the block ends."""
    token = _context.set({**current(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def step(name, *, key="session_id"):
    """Decorate a job's entry point ``run_x(id, ...)``: its id and ``name`` on every line it logs, and one line
    when it starts and one when it ends (with its duration), so every step leaves a trace in the log."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(object_id, *args, **kwargs):
            with bound(**{key: object_id}, step=name):
                started = time.monotonic()
                log.info("%s started", name)
                try:
                    result = func(object_id, *args, **kwargs)
                except BaseException:
                    log.warning("%s ended with an error after %.1f s", name, time.monotonic() - started)
                    raise
                log.info("%s ended after %.1f s", name, time.monotonic() - started)
                return result

        return wrapper

    return decorate


class SessionFilter(logging.Filter):
    """Puts the bound ids on every record: ``record.session_id`` (None outside a step), ``record.step``,
    ``record.plan_id``, and ``record.context`` (" session=7 step=phase1" or "") for the plain format."""

    def filter(self, record):
        ids = current()
        record.session_id = ids.get("session_id")
        record.plan_id = ids.get("plan_id")
        record.step = ids.get("step")
        record.context = "".join(f" {k}={v}" for k, v in ids.items())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the bound ids, and the
    exception's traceback when there is one."""

    def format(self, record):
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("session_id", "plan_id", "step"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)
