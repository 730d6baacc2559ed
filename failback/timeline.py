"""The session page's timeline: one row per step, from the session's timestamps.

A step runs from its start stamp to the stamp that ends it. A session that ended (or is being cancelled)
before a step's end was stamped closes that step at ``ended_at`` and says how it ended, so a stopped
session never shows a step as still running.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from .choices import TERMINAL, SessionStatus


@dataclass(frozen=True)
class Step:
    label: str
    start: datetime | None
    end: datetime | None = None
    detail: str = ""  # after the duration: how the replica was stopped
    note: str = ""  # "running", or how an unfinished step ended: "cancelled", "failed", …
    production_on: datetime | None = None  # Failback: when production was powered on
    window: timedelta | None = None  # Failback: the switch window users felt
    current: bool = False  # the step the session is in now (highlighted)
    stopped: bool = False  # the session ended during this step

    @property
    def state(self):
        """done, current, stopped (ended unfinished) or pending: the row's look on the vertical timeline."""
        if self.current:
            return "current"
        if self.start is None:
            return "pending"
        return "stopped" if self.stopped else "done"

    @property
    def duration(self):
        """How long the step took, or has taken so far when it is the current one; None before it began."""
        if self.start is None:
            return None
        if self.end is not None:
            return self.end - self.start
        return timezone.now() - self.start if self.current else None


ENDINGS = {
    SessionStatus.CANCELLED: "cancelled",
    SessionStatus.FAILED: "failed",
    SessionStatus.UNDONE: "undone",
    SessionStatus.COMMITTED: "committed",
}


def session_timeline(session):
    """The steps of ``session`` in order; the last is its end."""
    s = session
    steps = [
        ("Phase 1", s.phase1_started_at, s.phase1_ended_at, ""),
        ("Ready to switch", s.phase1_ended_at, s.switch_started_at, ""),
        ("Stop replica", s.replica_stop_started_at, s.replica_off_at, s.stop_method),
        ("Send changes", s.replica_off_at, s.phase2_ended_at, ""),
    ]
    first_step = s.phase1_started_at or s.ended_at
    out = [Step("Queued", s.created_at, first_step, current=first_step is None)]
    for label, start, end, detail in steps:
        out.append(_step(s, label, start, end, detail))
    # Open-ended: Failback lasts until commit or undo, which the last row shows.
    waiting = s.phase2_ended_at is not None and s.ended_at is None
    out.append(
        Step(
            "Failback",
            s.phase2_ended_at,
            s.ended_at if s.phase2_ended_at else None,
            production_on=s.production_on_at,
            window=s.switch_window,
            current=waiting,
        )
    )
    ending = {SessionStatus.UNDONE: "Undone", SessionStatus.COMMITTED: "Committed"}.get(s.status, "Ended")
    out.append(Step(ending, s.ended_at, note=f"({s.get_status_display()})" if s.ended_at else ""))
    return out


def _step(session, label, start, end, detail):
    if start is None or end is not None:
        return Step(label, start, end, detail if end else "")
    if session.status in TERMINAL:  # it stopped here: closed when the session ended
        ending = ENDINGS.get(session.status, session.get_status_display().lower())
        return Step(label, start, session.ended_at, note=ending, stopped=True)
    if session.status == SessionStatus.CANCELLING:
        return Step(label, start, note="stopping (cancel asked)", current=True)
    return Step(label, start, note="running" if label != "Ready to switch" else "waiting", current=True)
