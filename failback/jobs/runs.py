"""Who may write for a step: the session's lease (``Run``), the fence the engine polls, the fenced
platform, and the lease-checked progress saves and audit notes every step writes through.

Also the few helpers every step shares: the session's disk lock and state folder, and how an error
reads to the admin."""

import errno
import fcntl
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F
from django.utils import timezone

from .. import broadcast, workflow
from ..choices import Outcome
from ..models import FailbackSession
from ..templatetags.failback_tags import binary_size

log = logging.getLogger(__name__)

LeaseLost = workflow.LeaseLost


def _state_dir(session_id, disk_key):
    path = settings.FAILBACK_STATE_DIR / str(session_id) / disk_key.replace(":", "_").replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _drop_state(session_id):
    shutil.rmtree(settings.FAILBACK_STATE_DIR / str(session_id), ignore_errors=True)


@contextmanager
def session_lock(session_id, *, wait=True):
    """One worker touches a session's production disks at a time (phase 1, catch-up, switch, cancel).

    An flock: the kernel releases it when a worker dies, so a resumed step never waits for a corpse.
    Yields False when ``wait`` is off and another worker holds it."""
    folder = settings.FAILBACK_STATE_DIR / str(session_id)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Run:
    """One run of a step, holding the session's lease: a fencing token that only grows.

    Taking the lease (``Run.take``) adds one to the session's ``lease``, so a run started later for the
    same session (the watchdog resuming a step it thought dead) fences every earlier one: their progress
    saves, audit rows, state changes and platform actions check the token and raise LeaseLost instead
    of writing. The engine sees the fence through ``fence``, which it polls at every block."""

    CHECK_EVERY_S = 1.0  # how stale the engine's view of the lease may be (a pause makes it stale at once)

    def __init__(self, session_id, token):
        self.session_id, self.token = session_id, token
        self.lost = False
        self.checked = time.monotonic()

    @classmethod
    def take(cls, session_id, *statuses):
        """The lease for a run of the step of ``statuses``; None when the session is no longer there."""
        with transaction.atomic():
            if not FailbackSession.objects.filter(pk=session_id, status__in=statuses).update(
                lease=F("lease") + 1, heartbeat_at=timezone.now()
            ):
                return None
            return cls(session_id, FailbackSession.objects.values_list("lease", flat=True).get(pk=session_id))

    def mine(self):
        return FailbackSession.objects.filter(pk=self.session_id, lease=self.token)

    def check(self):
        self.checked = time.monotonic()
        if self.lost or not self.mine().exists():
            self.lost = True
            raise LeaseLost(f"failback #{self.session_id}: lease {self.token} was taken over")

    def fence(self, cancel):
        """An ``is_set()`` for the engine: true once ``cancel`` is set or the lease is gone."""
        return Fence(self, cancel)

    def hypervisor(self, hv):
        return FencedHypervisor(hv, self)

    @contextmanager
    def beating(self):
        """Renew the heartbeat every FAILBACK_HEARTBEAT_SECONDS while the run works or waits (for the
        session's lock, a guest, the platform), so the watchdog takes over silent runs, not slow ones.
        A paused process pauses this thread too: its lease can still be taken over."""
        stop = threading.Event()

        def renew():
            try:
                while not stop.wait(settings.FAILBACK_HEARTBEAT_SECONDS):
                    try:
                        if not self.mine().update(heartbeat_at=timezone.now()):
                            return  # taken over (or not visible yet): the run's own checks decide
                    except DatabaseError:
                        continue  # the database is busy: try again at the next beat
            finally:
                connection.close()

        beater = threading.Thread(target=renew, name=f"heartbeat-{self.session_id}", daemon=True)
        beater.start()
        try:
            yield self
        finally:
            stop.set()
            beater.join()


class Fence:
    """What the engine polls at every block in place of its cancel event."""

    def __init__(self, run, cancel):
        self.run, self.cancel = run, cancel

    def is_set(self):
        if self.cancel.is_set() or self.run.lost:
            return True
        if time.monotonic() - self.run.checked >= Run.CHECK_EVERY_S:
            try:
                self.run.check()
            except LeaseLost:
                return True
        return False


class FencedHypervisor:
    """The platform as one run sees it: an action that changes a VM first checks the run's lease."""

    ACTIONS = frozenset({"create_vm_like", "delete_vm", "power_on", "power_off", "shutdown_guest", "copy_disk_network"})

    def __init__(self, inner, run):
        self._inner, self._run = inner, run

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in self.ACTIONS:
            return attr

        def fenced(*args, **kwargs):
            self._run.check()
            return attr(*args, **kwargs)

        return fenced


def _note(session, action, detail, *, outcome=Outcome.OK, data=None, run=None):
    with transaction.atomic():
        if run is not None and not run.mine().select_for_update().exists():
            run.lost = True
            raise LeaseLost(f"failback #{session.pk}: {action} not written, the step was taken over")
        workflow.audit(
            action=action,
            outcome=outcome,
            session=session,
            from_state=session.status,
            to_state=session.status,
            detail=detail,
            data=data,
        )
        broadcast.session_changed(session.pk)


def _save(obj, run=None, **fields):
    """Save only the fields given; with a run, only while it holds the lease (else LeaseLost)."""
    for name, value in fields.items():
        setattr(obj, name, value)
    rows = type(obj).objects.filter(pk=obj.pk)
    if run is not None:
        rows = (
            rows.filter(lease=run.token) if isinstance(obj, FailbackSession) else rows.filter(session__lease=run.token)
        )
    if not rows.update(**fields) and run is not None:
        run.lost = True
        raise LeaseLost(f"failback #{run.session_id}: {', '.join(fields)} not saved, the step was taken over")


def _beat(run, *_):
    if not run.mine().update(heartbeat_at=timezone.now()):
        run.lost = True
        raise LeaseLost(f"failback #{run.session_id}: the step was taken over")


def _take(session_id, status, action, not_run):
    """The session and a lease for a run of the step of ``status``; the run is None, and that is noted,
    when the session has moved on (a task delivered twice, or late)."""
    session = FailbackSession.objects.select_related("replica").get(pk=session_id)
    run = Run.take(session_id, status)
    if run is None:
        session.refresh_from_db()
        _note(
            session,
            action,
            f"{not_run}: failback #{session.pk} is {session.get_status_display()}",
            outcome=Outcome.INFO,
        )
    return session, run


@contextmanager
def superseded(session_id, step):
    """Around a run: a run that lost its lease ends here quietly; the run that took over carries on."""
    try:
        yield
    except LeaseLost as lost:
        log.warning("%s of failback #%s stopped without writing: %s", step, session_id, lost)


def _size(n):
    """A size as the pages write it (binary units, scaled: '512 B', '4.0 KiB', '2.3 MiB', '1.5 GiB')."""
    return binary_size(n)


def _reason(session, exc):
    """The error as the admin should read it: a full disk says which one; anything else as raised."""
    if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return str(exc)
    if shutil.disk_usage(settings.FAILBACK_STATE_DIR).free < 1 << 20:
        return f"No space left in the portal's state directory {settings.FAILBACK_STATE_DIR} ({exc})"
    return f"No space left on datastore {session.target_datastore} while writing the disks of production VM {session.vm_name} ({exc})"
