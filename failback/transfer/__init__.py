"""Disk transfer for failback: phase 1 full copy, phase 2 delta, verification. No Django here.

See :mod:`failback.transfer.engine` for how a pass works and :mod:`failback.transfer.blockmap` for
the digest map, the checkpoint and the end-to-end digest.
"""

from .engine import (
    CopyResult,
    TransferCancelled,
    TransferStateError,
    VerificationError,
    delta_copy,
    disk_digest,
    full_copy,
    verify_target,
)
from .progress import Progress

__all__ = [
    "CopyResult",
    "Progress",
    "TransferCancelled",
    "TransferStateError",
    "VerificationError",
    "delta_copy",
    "disk_digest",
    "full_copy",
    "verify_target",
]
