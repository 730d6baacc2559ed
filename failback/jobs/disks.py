"""A VM's disks in parallel within one step (the switch's final delta and proof, a catch-up sync), bounded
by FAILBACK_DISK_THREADS, so a VM with many disks is not the sum of them.

The split keeps the lease and the database in the calling thread: a worker thread runs only the engine
(``transfer.*``) on file paths worked out beforehand, and touches neither the database nor the platform.
Its cancel flag is a plain event; its progress is kept (the latest report per disk) and handed to that
disk's ``ProgressSink`` by the calling thread, which also checks the lease every ``Run.CHECK_EVERY_S``
and renews the heartbeat, and saves each disk's result and writes its audit row as the disk finishes.
The first failure (a disk's error, a wrong result, the lease lost) stops the other disks at their next
block and is raised once they have all stopped, so a step never ends with a disk still being written.
Worker threads close the database connection of their own thread, should anything have opened one.
"""

import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection

from ..transfer import TransferCancelled
from .progress import ProgressSink
from .runs import LeaseLost, Run, _beat

TICK_S = 0.05  # how often the calling thread hands progress on and looks for finished disks
BEAT_S = 5.0  # heartbeat renewals from the calling thread (the run's own beating thread renews too)


@dataclass
class DiskWork:
    """One disk's share of a step.

    ``work(progress, cancel)`` runs in a worker thread and must not touch the database or the platform;
    ``sink(progress)`` (optional; it also keeps the session's chart) and ``done(result)`` run in the
    calling thread."""

    key: str
    work: Callable[[Callable, threading.Event], Any]
    done: Callable[[Any], None]
    sink: ProgressSink | None = None


class _Latest:
    """The engine's progress callback in a worker thread: keeps the latest report for the calling thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.report = None

    def __call__(self, p):
        with self.lock:
            self.report = p

    def take(self):
        with self.lock:
            p, self.report = self.report, None
        return p


class _SharedChart:
    """The sinks (``progress.ProgressSink``) of several disks write one session's throughput chart: each
    reads what the others added."""

    def __init__(self):
        self.samples = None
        self.last_sample = 0.0

    def call(self, sink, p):
        if self.samples is not None:
            sink.samples, sink.last_sample = self.samples, self.last_sample
        sink(p)
        self.samples, self.last_sample = sink.samples, sink.last_sample


def _rank(exc):
    """Which failure a step reports when several disks stop: the lease, then a real error, then a cancel."""
    if isinstance(exc, LeaseLost):
        return 2
    return 0 if isinstance(exc, TransferCancelled) else 1


def thread_count(disks):
    return max(1, min(settings.FAILBACK_DISK_THREADS, disks))


def _in_worker(work, progress, cancel):
    try:
        return work(progress, cancel)
    finally:
        connection.close()  # the engine uses no database; should anything open a connection here, it ends here


def run_disks(run: Run, items: list[DiskWork], cancel: threading.Event):
    """Run every disk's ``work`` on a bounded pool, handling progress, results and the lease here.

    ``cancel`` is what the workers poll: set here on a failure or a lost lease, and by a sink that sees
    the session leave its status. Raises the first failure once every disk has stopped: a lost lease
    before an error, an error before a cancel."""
    if not items:
        return
    step = _Step(run, items, cancel)
    with ThreadPoolExecutor(max_workers=thread_count(len(items)), thread_name_prefix=f"disks-{run.session_id}") as pool:
        # Each disk's thread runs in a copy of this context: its log lines carry the session's id (logging_context).
        futures = {
            pool.submit(contextvars.copy_context().run, _in_worker, item.work, step.latest[i], cancel): i
            for i, item in enumerate(items)
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=TICK_S, return_when=FIRST_COMPLETED)
            step.tick()
            for future in finished:
                step.finished(futures[future], future)
    step.raise_failure()


class _Step:
    """The calling thread's side of ``run_disks``: progress handed on, the lease checked, results recorded."""

    def __init__(self, run, items, cancel):
        self.run, self.items, self.cancel = run, items, cancel
        self.latest = [_Latest() for _ in items]
        self.chart = _SharedChart()
        self.checked = self.beaten = time.monotonic()
        self.failure = None

    def fail(self, exc):
        self.cancel.set()
        if self.failure is None or _rank(exc) > _rank(self.failure):
            self.failure = exc

    def tick(self):
        try:
            for item, latest in zip(self.items, self.latest, strict=True):
                p = latest.take()
                if p is not None and item.sink is not None and self.failure is None:
                    self.chart.call(item.sink, p)
            now = time.monotonic()
            if not isinstance(self.failure, LeaseLost) and now - self.checked >= Run.CHECK_EVERY_S:
                self.checked = now
                self.run.check()
            if self.failure is None and now - self.beaten >= BEAT_S:
                self.beaten = now
                _beat(self.run)
        except BaseException as exc:  # noqa: BLE001  raised once every disk has stopped
            self.fail(exc)

    def finished(self, i, future):
        """A disk is through: recorded (even after another disk failed, unless the lease is gone), or its error kept."""
        try:
            result = future.result()
            if not isinstance(self.failure, LeaseLost):
                self.items[i].done(result)
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc)

    def raise_failure(self):
        if self.failure is None:
            return
        if isinstance(self.failure, TransferCancelled):
            self.run.check()  # a sink that found the lease gone cancelled the disks: that is the lease lost
        raise self.failure
