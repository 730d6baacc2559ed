"""Network transport: the datastore HTTP interface reads ranges but writes whole files only, so both
phases stream the whole disk (a GET piped into a PUT), and phase 2 verifies by reading both disks back
over HTTP and comparing SHA-256 digests. While a disk streams, its progress is reported as the direct
path's is (bounded rate, time left, cancel at the next chunk), and phase 1 keeps to the session's
bandwidth limit."""

import hashlib
import threading
import time

from django.conf import settings

from .. import broadcast, prediction
from ..choices import SessionStatus
from ..transfer import TransferCancelled
from ..transfer.progress import Pacer, Reporter, paused
from .progress import ProgressSink
from .runs import _note, _save, _size


def _network(hv):
    return hv.transport == "network"


def _network_digest(hv, vm_id, disk_key, capacity, chunk=8 << 20):
    digest = hashlib.sha256()
    for offset in range(0, capacity, chunk):
        digest.update(hv.download_range(vm_id, disk_key, offset, min(chunk, capacity - offset)))
    return f"sha256:{digest.hexdigest()}"


class _Stream:
    """The ``progress`` callback of ``copy_disk_network``: progress reports at a bounded rate, the bandwidth
    limit, and a cancel that stops the stream at its next chunk (TransferCancelled)."""

    PAUSE_TICK = 0.05  # seconds between cancel checks while the limit holds the stream back

    def __init__(self, total, sink, cancel, limit_bps):
        self.reporter = Reporter(total, sink, settings.FAILBACK_PROGRESS_INTERVAL)
        self.pacer = Pacer(limit_bps)
        self.cancel = cancel
        self.sent = 0

    def tick(self):
        if self.cancel.is_set():
            raise TransferCancelled("transfer cancelled")
        self.reporter.maybe_emit()

    def __call__(self, sent):
        n, self.sent = sent - self.sent, sent
        self.reporter.done = self.reporter.written = sent
        self.tick()
        end = self.pacer.now() + self.pacer.delay_after(n)
        while (left := end - self.pacer.now()) > 0:
            self.pacer.sleep(min(left, self.PAUSE_TICK))
            self.tick()


def _network_copy(run, hv, session, disk, *, phase, cancel=None):
    """One disk, whole, over the network: phase 1 copies it (a prediction.Copy back); phase 2 copies it
    again and verifies."""
    replica = session.replica
    why = (
        "Network transport: the whole disk is streamed through the datastore HTTP interface (GET piped into PUT)"
        if phase == 1
        else "Network transport cannot write ranges: the whole disk is sent again while the replica is off"
    )
    _save(
        disk,
        run,
        phase=phase,
        method="full",
        method_reason=why,
        bytes_total=disk.capacity_bytes,
        bytes_done=0,
        bytes_written=0,
        eta_s=None,
    )
    broadcast.send_now(session.pk)
    cancel = cancel or threading.Event()
    expect = SessionStatus.PHASE1 if phase == 1 else SessionStatus.SWITCHING
    sink = ProgressSink(disk, expect=expect, cancel=cancel, run=run)
    limit = session.bandwidth_mbps * 1_000_000 if phase == 1 and session.bandwidth_mbps else None  # phase 1 only
    stream = _Stream(disk.capacity_bytes, sink, run.fence(cancel), limit)
    with paused() as held:
        started = time.monotonic()
        sent = hv.copy_disk_network(replica.vm_id, session.production_vm_id, disk.key, progress=stream)
        seconds = time.monotonic() - started
    stream.reporter.final()
    fields = {
        "bytes_done": disk.capacity_bytes,
        "bytes_written": sent,
        "rate_bps": sent / seconds if seconds else 0,
        "eta_s": 0,
    }
    data = {
        "disk": disk.key,
        "method": "full",
        "transport": "network",
        "why": why,
        "bytes_written": sent,
        "seconds": round(seconds, 3),
        "limit_held_s": round(held.seconds, 3),
        "working_s": round(max(seconds - held.seconds - sink.busy_s, 0.0), 3),
    }
    if phase == 1:
        _save(disk, run, phase1_bytes_written=sent, **fields)
        _note(
            session,
            "copy_disk",
            f"Disk {disk.key}: {_size(sent)} sent over the network in {seconds:.1f} s (full copy)",
            data=data,
            run=run,
        )
        return prediction.Copy(sent, sent, seconds, held.seconds, sink.busy_s)
    _verify_network_copy(run, hv, session, disk, sent, fields, data)


def _verify_network_copy(run, hv, session, disk, sent, fields, data):
    source_digest = _network_digest(hv, session.replica.vm_id, disk.key, disk.capacity_bytes)
    target_digest = _network_digest(hv, session.production_vm_id, disk.key, disk.capacity_bytes)
    verified = source_digest == target_digest
    _save(
        disk,
        run,
        phase2_bytes_written=sent,
        source_digest=source_digest,
        target_digest=target_digest,
        verified=verified,
        **fields,
    )
    data.update(source_digest=source_digest, target_digest=target_digest)
    if not verified:
        raise RuntimeError(
            f"Disk {disk.key} differs after the final copy: replica {source_digest}, production {target_digest}"
        )
    _note(
        session,
        "send_changes",
        f"Disk {disk.key}: {_size(sent)} sent over the network (whole disk); production disk verified identical",
        data=data,
        run=run,
    )
