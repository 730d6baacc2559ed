"""What the engine's calls return and raise (see :mod:`.engine`)."""

from __future__ import annotations

from dataclasses import dataclass


class TransferCancelled(Exception):
    """The pass stopped because its cancel flag was set. The checkpoint is kept."""


class VerificationError(Exception):
    """The target does not hold what the leaves say. ``offset`` is the first bad grain's."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class TransferStateError(RuntimeError):
    """The state directory does not fit the request (no completed full copy, other disk, ...)."""


class StateBusyError(TransferStateError):
    """Another pass holds the state directory (see :func:`.state.locked`); nothing was read or written."""


@dataclass(frozen=True)
class CopyResult:
    method: str  # "full" | "tracked" | "digest"
    bytes_total: int
    bytes_read: int  # from the source
    bytes_written: int  # to the target (punched holes count zero)
    zero_bytes_skipped: int
    seconds: float
    digest: str  # disk digest of the target after this pass (from its leaves)
    resumed_from: int  # byte offset resumed from (0 when fresh)
    source_digest: str = ""  # disk digest of the source as this pass left its leaves
    target_bytes_read: int = 0  # target grains read to compare, read back, or re-read
    target_untouched: bool = True  # False: the target had changed since the last pass and was re-read


@dataclass(frozen=True)
class DiskProof:
    """What :func:`.engine.verify_changes` established about one disk."""

    source_digest: str
    target_digest: str
    identical: bool
    source_sealed: bool  # the source had not changed since the last delta (else re-read in full)
    target_sealed: bool  # the target had not changed since the last delta (else re-read in full)
    bytes_read: int
    sampled_grains: int
    seconds: float
