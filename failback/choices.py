"""States of replicas and failback sessions, and the transitions allowed between them.

The names shown to users are the DOMAIN's (Ready, Failover, Ready to switch, Failback).
Which action may move a session from which status lives in TRANSITIONS below and nowhere else.
"""

from dataclasses import dataclass

from django.db import models


class ReplicaState(models.TextChoices):
    READY = "ready", "Ready"  # normal replication; no failover in effect
    FAILOVER = "failover", "Failover"  # the replica runs the workload; failback may start only here
    READY_TO_SWITCH = "ready_to_switch", "Ready to switch"  # phase 1 done; the replica still runs
    FAILBACK = "failback", "Failback"  # phase 2 done; production runs; replica off until commit/undo


class SessionStatus(models.TextChoices):
    QUEUED = "queued", "Queued"  # accepted, waiting for a worker
    PHASE1 = "phase1", "Phase 1 running"  # building the production VM and copying data
    READY_TO_SWITCH = "ready_to_switch", "Ready to switch"  # waiting for the switch moment
    SWITCHING = "switching", "Switching"  # phase 2: replica stopping, final delta, power on
    FAILBACK = "failback", "Failback"  # production runs; waiting for commit or undo
    COMMITTING = "committing", "Committing"
    UNDOING = "undoing", "Undoing"
    COMMITTED = "committed", "Committed"  # ending: production kept
    UNDONE = "undone", "Undone"  # ending: back on the replica
    FAILED = "failed", "Failed"  # ending: see the error; the replica runs
    CANCELLING = "cancelling", "Cancelling"  # stopping phase 1 or catch-up before the switch
    CANCELLED = "cancelled", "Cancelled"  # ending: stopped before the switch


ACTIVE = frozenset(
    {
        SessionStatus.QUEUED,
        SessionStatus.PHASE1,
        SessionStatus.READY_TO_SWITCH,
        SessionStatus.SWITCHING,
        SessionStatus.FAILBACK,
        SessionStatus.COMMITTING,
        SessionStatus.UNDOING,
        SessionStatus.CANCELLING,
    }
)
TERMINAL = frozenset(set(SessionStatus) - ACTIVE)
# Statuses in which a worker is (or should be) doing something.
RUNNING = frozenset({SessionStatus.QUEUED, SessionStatus.PHASE1, SessionStatus.SWITCHING, SessionStatus.COMMITTING, SessionStatus.UNDOING,
                     SessionStatus.CANCELLING})

STATUS_COLOURS = {
    SessionStatus.QUEUED: "grey",
    SessionStatus.PHASE1: "blue",
    SessionStatus.READY_TO_SWITCH: "teal",
    SessionStatus.SWITCHING: "orange",
    SessionStatus.FAILBACK: "purple",
    SessionStatus.COMMITTING: "purple",
    SessionStatus.UNDOING: "orange",
    SessionStatus.COMMITTED: "green",
    SessionStatus.UNDONE: "grey",
    SessionStatus.FAILED: "red",
    SessionStatus.CANCELLING: "orange",
    SessionStatus.CANCELLED: "grey",
}
REPLICA_COLOURS = {
    ReplicaState.READY: "green",
    ReplicaState.FAILOVER: "red",
    ReplicaState.READY_TO_SWITCH: "teal",
    ReplicaState.FAILBACK: "purple",
}


class SwitchMode(models.TextChoices):
    AUTO = "auto", "Automatically after phase 1"
    SCHEDULED = "scheduled", "At a scheduled time"
    MANUAL = "manual", "Manually (Switch now)"


class CommitPolicy(models.TextChoices):
    NONE = "none", "None (an operator commits or undoes)"
    AUTO_COMMIT = "auto_commit", "Commit automatically after N minutes in Failback"
    AUTO_UNDO = "auto_undo", "Undo automatically after N minutes in Failback"


class Outcome(models.TextChoices):
    OK = "ok", "OK"
    REFUSED = "refused", "Refused"
    FAILED = "failed", "Failed"
    INFO = "info", "Info"


@dataclass(frozen=True)
class Transition:
    label: str  # what the audit and refusals call it
    sources: frozenset  # session statuses it may start from
    target: str  # session status it leads to
    replica_from: str | None = None  # replica state required (and changed) ...
    replica_to: str | None = None  # ... to this one, in the same transaction


S, R = SessionStatus, ReplicaState
TRANSITIONS = {
    "begin_phase1": Transition("Begin phase 1", frozenset({S.QUEUED}), S.PHASE1),
    "finish_phase1": Transition("Finish phase 1", frozenset({S.PHASE1}), S.READY_TO_SWITCH, R.FAILOVER, R.READY_TO_SWITCH),
    "fail_phase1": Transition("Fail phase 1", frozenset({S.QUEUED, S.PHASE1}), S.FAILED),
    "switch": Transition("Switch now", frozenset({S.READY_TO_SWITCH}), S.SWITCHING),
    "finish_switch": Transition("Finish switch", frozenset({S.SWITCHING}), S.FAILBACK, R.READY_TO_SWITCH, R.FAILBACK),
    # A failed switch brings the replica back up: it runs the workload again, a new failback may start.
    "fail_switch": Transition("Fail switch", frozenset({S.SWITCHING}), S.FAILED, R.READY_TO_SWITCH, R.FAILOVER),
    "commit": Transition("Commit", frozenset({S.FAILBACK}), S.COMMITTING),
    "finish_commit": Transition("Finish commit", frozenset({S.COMMITTING}), S.COMMITTED, R.FAILBACK, R.READY),
    "undo": Transition("Undo", frozenset({S.FAILBACK}), S.UNDOING),
    "finish_undo": Transition("Finish undo", frozenset({S.UNDOING}), S.UNDONE, R.FAILBACK, R.FAILOVER),
    # An undo that could not finish after its attempts: the replica is the workload's home again (the
    # failure says what to do by hand); the session ends so that nothing retries it forever.
    "fail_undo": Transition("Fail undo", frozenset({S.UNDOING}), S.FAILED, R.FAILBACK, R.FAILOVER),
    # Cancel before any work started: nothing to clean up (also how a plan withdraws its other members).
    "cancel": Transition("Cancel", frozenset({S.QUEUED}), S.CANCELLED),
    # Cancel while phase 1 copies: the worker stops at its next progress tick and cleans up.
    "cancel_phase1": Transition("Cancel", frozenset({S.PHASE1}), S.CANCELLING),
    # Cancel while ready to switch: the replica never stopped, so it simply goes on running in Failover.
    "cancel_ready": Transition("Cancel", frozenset({S.READY_TO_SWITCH}), S.CANCELLING, R.READY_TO_SWITCH, R.FAILOVER),
    "finish_cancel": Transition("Finish cancel", frozenset({S.CANCELLING}), S.CANCELLED),
}
CANCELLABLE = frozenset({S.QUEUED, S.PHASE1, S.READY_TO_SWITCH})
# Schedule switch changes the switch moment without changing status; legal until the switch begins.
SCHEDULABLE = frozenset({S.QUEUED, S.PHASE1, S.READY_TO_SWITCH})
del S, R
