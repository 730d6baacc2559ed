"""The lab's files: a re-entrant flock across threads and processes, and JSON replaced atomically."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

_held = threading.local()  # lock path -> [fd, depth] for this thread (the lock is re-entrant)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Exclusive flock on ``path``; re-entrant within a thread, exclusive between threads and processes."""
    key = str(path)
    held = getattr(_held, "locks", None)
    if held is None:
        held = _held.locks = {}
    entry = held.get(key)
    if entry is not None:
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held[key] = [fd, 1]
        try:
            yield
        finally:
            del held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
