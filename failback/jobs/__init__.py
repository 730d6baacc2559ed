"""The long-running steps of a failback, run by django-q2 workers (see tasks.py).

Each step talks to the platform only through the hypervisor interface and to the disks only
through the transfer engine, and changes state only through ``workflow.transition``. What every
step did, with its figures, goes to the audit trail.

The modules, in the order a failback meets them:

- ``runs``: the lease (``Run``), the fence the engine polls, the fenced platform, lease-checked
  saves and audit notes, the session's disk lock and state folder;
- ``progress``: the engine's progress as the session's page sees it;
- ``network``: whole-disk copies and their verification over the network transport;
- ``phase1``: the production VM built and every disk copied while the replica runs;
- ``readiness``: catch-up syncs and the predicted window while Ready to switch;
- ``switch``: phase 2, and the replica brought back when it fails;
- ``finish``: commit, undo, cancel, and which production VM a session may touch;
- ``plan_switch``: a plan's members switched in boot order.

Every name is re-exported here, so ``failback.jobs.X`` keeps working. A module reads its own
globals: to patch a constant or a helper, patch it on the module that uses it (``jobs.switch``),
not here.
"""

from .finish import (
    UNDO_ATTEMPTS,
    _back_to_replica,
    _discard_production_vm,
    _powered_on,
    _undo,
    owned_vm,
    run_cancel,
    run_commit,
    run_undo,
)
from .network import _network, _network_copy, _network_digest
from .phase1 import _announce_phase1, _phase1, _reusable_state, run_phase1
from .plan_switch import run_plan_switch
from .progress import MAX_SAMPLES, SAMPLE_EVERY, ProgressSink
from .readiness import _catch_up, _refresh_readiness, run_readiness
from .runs import (
    Fence,
    FencedHypervisor,
    LeaseLost,
    Run,
    _beat,
    _drop_state,
    _note,
    _reason,
    _save,
    _size,
    _state_dir,
    _take,
    session_lock,
    superseded,
)
from .switch import (
    RECOVERY_ATTEMPTS,
    _announce_phase2,
    _power_on_production,
    _record_window,
    _recover_replica,
    _send_changes,
    _stop_replica,
    _switch,
    run_power_on,
    run_switch,
)

__all__ = [
    "MAX_SAMPLES",
    "RECOVERY_ATTEMPTS",
    "SAMPLE_EVERY",
    "UNDO_ATTEMPTS",
    "Fence",
    "FencedHypervisor",
    "LeaseLost",
    "ProgressSink",
    "Run",
    "_announce_phase1",
    "_announce_phase2",
    "_back_to_replica",
    "_beat",
    "_catch_up",
    "_discard_production_vm",
    "_drop_state",
    "_size",
    "_network",
    "_network_copy",
    "_network_digest",
    "_note",
    "_phase1",
    "_power_on_production",
    "_powered_on",
    "_reason",
    "_record_window",
    "_recover_replica",
    "_refresh_readiness",
    "_reusable_state",
    "_save",
    "_send_changes",
    "_state_dir",
    "_stop_replica",
    "_switch",
    "_take",
    "_undo",
    "owned_vm",
    "run_cancel",
    "run_commit",
    "run_phase1",
    "run_plan_switch",
    "run_power_on",
    "run_readiness",
    "run_switch",
    "run_undo",
    "session_lock",
    "superseded",
]
