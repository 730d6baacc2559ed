"""Disk transfer for failback: phase 1 full copy, phase 2 delta, verification. No Django here.

See :mod:`failback.transfer.engine` for how a pass works and :mod:`failback.transfer.blockmap` for
the leaves, the seals, the checkpoint and the disk digest (a hash tree).
"""

from .engine import (
    CopyResult,
    DiskProof,
    StateBusyError,
    TransferCancelled,
    TransferStateError,
    VerificationError,
    delta_copy,
    disk_digest,
    full_copy,
    target_untouched,
    verify_changes,
    verify_target,
)
from .progress import Progress

__all__ = [
    "CopyResult",
    "DiskProof",
    "Progress",
    "StateBusyError",
    "TransferCancelled",
    "TransferStateError",
    "VerificationError",
    "delta_copy",
    "disk_digest",
    "full_copy",
    "target_untouched",
    "verify_changes",
    "verify_target",
]
