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
RUNNING = frozenset(
    {
        SessionStatus.QUEUED,
        SessionStatus.PHASE1,
        SessionStatus.SWITCHING,
        SessionStatus.COMMITTING,
        SessionStatus.UNDOING,
        SessionStatus.CANCELLING,
    }
)

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


class GuestGate(models.TextChoices):
    """What a plan waits for after a member's power-on, before the next member's (guest_gate.py)."""

    NONE = "", "No gate (only the delay between power-ons)"
    GUEST = "guest", "The guest is ready (VMware Tools heartbeat; the lab's guest state)"
    TCP = "tcp", "A TCP port accepts connections"


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
    "finish_phase1": Transition(
        "Finish phase 1", frozenset({S.PHASE1}), S.READY_TO_SWITCH, R.FAILOVER, R.READY_TO_SWITCH
    ),
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
    # Cancel a queued failback that reuses the production VM an earlier one kept: nothing was copied yet,
    # but that VM exists; the cancel step keeps it or deletes it, as asked.
    "cancel_reused": Transition("Cancel", frozenset({S.QUEUED}), S.CANCELLING),
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

# Which step a running status belongs to, for the watchdog (a status a worker step owns).
STEP_OF = {
    SessionStatus.PHASE1: "phase1",
    SessionStatus.SWITCHING: "phase2",
    SessionStatus.COMMITTING: "commit",
    SessionStatus.UNDOING: "undo",
    SessionStatus.CANCELLING: "cancel",
}


# -- what an operator may do to one session now: asked by the pages, the API and the service layer ------


@dataclass(frozen=True)
class Guard:
    """When an operator's action on one session is offered and accepted."""

    label: str  # the button's and the refusal's name for it
    sources: frozenset  # session statuses it is possible in
    plan_members: bool = True  # False: a plan's member is acted on through its plan's buttons only
    countdown: bool = False  # only while a commit policy counts down (not stopped)
    production_on: bool = False  # only once the production VM the switch was to power on has been powered on

    def allows(self, session):
        if session.status not in self.sources or (session.plan_id and not self.plan_members):
            return False
        if self.waits_for_production(session):
            return False
        return not self.countdown or (session.policy_due_at is not None and session.policy_stopped_at is None)

    def waits_for_production(self, session):
        """The switch was to power the production VM on and has not yet (the step that does it comes right
        after the switch, or the watchdog's when the worker stopped in between): until then the replica
        and the production VM are both off, and keeping production would end the failback that way."""
        return self.production_on and session.power_on_after and session.production_on_at is None


GUARDS = {
    "switch": Guard("Switch now", TRANSITIONS["switch"].sources, plan_members=False),
    "schedule_switch": Guard("Schedule switch", SCHEDULABLE, plan_members=False),
    "set_switch_windows": Guard("Maintenance windows", SCHEDULABLE, plan_members=False),
    "cancel": Guard("Cancel", CANCELLABLE, plan_members=False),
    "commit": Guard("Commit", TRANSITIONS["commit"].sources, production_on=True),
    "undo": Guard("Undo", TRANSITIONS["undo"].sources),
    "stop_commit_policy": Guard("Stop the countdown", frozenset({SessionStatus.FAILBACK}), countdown=True),
}


class Approvable(models.TextChoices):
    """The actions that cause downtime or lose data, which an Administrator may put behind a second person."""

    SWITCH = "switch", "Switch now"
    SCHEDULE_SWITCH = "schedule_switch", "Schedule switch"
    COMMIT = "commit", "Commit"
    UNDO = "undo", "Undo"
    CANCEL = "cancel", "Cancel"


class AuditAction(models.TextChoices):
    """Every action the audit trail records, one spelling each (AuditEvent.action)."""

    # a failback session: operators' actions and the steps they lead to
    START_FAILBACK = "start_failback", "Start failback"
    BEGIN_PHASE1 = "begin_phase1", "Begin phase 1"
    FINISH_PHASE1 = "finish_phase1", "Finish phase 1"
    FAIL_PHASE1 = "fail_phase1", "Fail phase 1"
    SWITCH = "switch", "Switch now"
    SCHEDULE_SWITCH = "schedule_switch", "Schedule switch"
    SCHEDULED_SWITCH = "scheduled_switch", "Scheduled switch due"
    FINISH_SWITCH = "finish_switch", "Finish switch"
    FAIL_SWITCH = "fail_switch", "Fail switch"
    COMMIT = "commit", "Commit"
    FINISH_COMMIT = "finish_commit", "Finish commit"
    UNDO = "undo", "Undo"
    FINISH_UNDO = "finish_undo", "Finish undo"
    FAIL_UNDO = "fail_undo", "Fail undo"
    CANCEL = "cancel", "Cancel"
    CANCEL_REUSED = "cancel_reused", "Cancel with a reused VM"
    CANCEL_PHASE1 = "cancel_phase1", "Cancel during phase 1"
    CANCEL_READY = "cancel_ready", "Cancel when ready to switch"
    FINISH_CANCEL = "finish_cancel", "Finish cancel"
    COMMIT_POLICY = "commit_policy", "Automatic commit or undo"
    STOP_COMMIT_POLICY = "stop_commit_policy", "Stop the countdown"
    OVERRIDE_CHECKS = "override_checks", "Override failed checks"
    REPLICA_STATE = "replica_state", "Replica state"
    DECLARE_FAILOVER = "declare_failover", "Declare failover"
    # the lab: rehearsing a failback again
    LAB_POWER_ON = "lab_power_on", "Power on a lab VM"
    LAB_POWER_OFF = "lab_power_off", "Power off a lab VM"
    RESET_LAB = "reset_lab", "Reset the demo lab"
    # the worker's steps and the watchdog
    PHASE1 = "phase1", "Phase 1"
    PHASE2 = "phase2", "Phase 2"
    RESUME = "resume", "Resume a silent step"
    CREATE_PRODUCTION_VM = "create_production_vm", "Create the production VM"
    DELETE_PRODUCTION_VM = "delete_production_vm", "Delete the production VM"
    COPY_DISK = "copy_disk", "Copy a disk"
    CATCH_UP = "catch_up", "Catch-up sync"
    PREDICT_WINDOW = "predict_window", "Predict the switch window"
    STOP_REPLICA = "stop_replica", "Stop the replica"
    SEND_CHANGES = "send_changes", "Send the last changes"
    SWITCH_WINDOW = "switch_window", "Switch window measured"
    POWER_ON_PRODUCTION = "power_on_production", "Power on production"
    RECOVER_REPLICA = "recover_replica", "Bring the replica back"
    RUN_HOOK = "run_hook", "Run a hook"
    GUEST_GATE = "guest_gate", "Wait for a guest to be ready"
    # switch when it fits: maintenance windows and a downtime budget (windows.py)
    SET_SWITCH_WINDOWS = "set_switch_windows", "Set maintenance windows and a downtime budget"
    WINDOW_WAITING = "window_waiting", "Waiting in a window for the downtime to fit"
    WINDOW_MISSED = "window_missed", "Maintenance window missed"
    CONVERGENCE_WARNING = "convergence_warning", "Writes outpace the copy"
    # four eyes: an action asked for, then approved (and run as the requester's) or rejected
    REQUEST_APPROVAL = "request_approval", "Ask for approval"
    APPROVE = "approve", "Approve"
    REJECT = "reject", "Reject"
    APPROVAL_EXPIRED = "approval_expired", "Approval request expired"
    APPROVAL_RULE = "approval_rule", "Change which actions need approval"
    # plans
    START_PLAN = "start_plan", "Start a plan"
    SWITCH_PLAN = "switch_plan", "Switch a plan"
    SCHEDULE_PLAN_SWITCH = "schedule_plan_switch", "Schedule a plan's switch"
    COMMIT_PLAN = "commit_plan", "Commit a plan"
    UNDO_PLAN = "undo_plan", "Undo a plan"
    # vCenter connections
    CREATE_CONNECTION = "create_connection", "Add a vCenter connection"
    UPDATE_CONNECTION = "update_connection", "Change a vCenter connection"
    FETCH_THUMBPRINT = "fetch_thumbprint", "Fetch a certificate thumbprint"
    TEST_CONNECTION = "test_connection", "Test a vCenter connection"
    SYNC_INVENTORY = "sync_inventory", "Sync a vCenter's inventory"
    PAIR_REPLICA = "pair_replica", "Pair a replica"
    # logins and API tokens
    LOGIN = "login", "Log in"
    LOGIN_FAILED = "login_failed", "Failed login"
    LOGIN_LOCKED_OUT = "login_locked_out", "Login locked out"
    API_TOKEN_CREATED = "api_token_created", "API token created"
    API_TOKEN_REVOKED = "api_token_revoked", "API token revoked"
    # notifications
    NOTIFY_ENDPOINT_SAVED = "notify_endpoint_saved", "Notification endpoint saved"
    NOTIFY_ENDPOINT_DELETED = "notify_endpoint_deleted", "Notification endpoint deleted"
    NOTIFY_SUBSCRIPTION = "notify_subscription", "E-mail subscriptions changed"
