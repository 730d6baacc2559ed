"""The predicted switch window: how long users would be without the service if the switch ran now.

    window = guest shutdown + final delta and verification + power-on

- guest shutdown: measured on this VM's last switch; else the platform's figure (the lab guest's
  configured shutdown time, 0 without guest tools, FAILBACK_PREDICT_SHUTDOWN_S on vSphere), never
  more than the session's shutdown timeout;
- data: the bytes changed on the replica since the production disk was last brought up to date
  (change tracking; without it, what the last catch-up found) are copied; a digest delta also reads
  the replica's data once. Verification reads only sampled grains of each side (the digests come from
  the leaves the passes kept: transfer.verify_changes), so it does not grow with the disks. The copy
  rate, the verification rate and the fixed overhead come from this VM's last switch, or else the
  rates of this session's phase 1;
- power-on: measured on this VM's last switch, else the platform's figure.

Every figure says where it came from, so the admin can judge it; the switch audits predicted
against actual, and what it measured becomes the next prediction's basis.
"""

from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone

from .hypervisors.base import POWERED_ON, HypervisorError

DEFAULT_POWER_ON_S = {"lab": 0.1}
VERIFY_SAMPLE_BYTES = 2 * 16 * 64 * 1024  # verify_changes re-reads 16 grains of 64 KiB on each side of a disk


@dataclass(frozen=True)
class Copy:
    """One disk's phase 1 copy, as the predictions see it."""

    bytes_read: int  # from the replica
    bytes_written: int  # to the production disk
    seconds: float  # wall time, everything included
    held_s: float = 0.0  # of which the bandwidth limit held the copy back (transfer.progress.paused)
    reporting_s: float = 0.0  # and of which its progress reports took (they grow with the wall time)

    @classmethod
    def of(cls, result, held_s=0.0, reporting_s=0.0):
        return cls(result.bytes_read, result.bytes_written, result.seconds, held_s, reporting_s)

    @property
    def working_s(self):
        """Reading, writing and hashing: the time the same copy would take without the limit."""
        return max(self.seconds - self.held_s - self.reporting_s, 0.0)


def phase1_rates(copies, *, limit_bps=None):
    """From phase 1's copies: what the next predictions build on. The rates are of the time spent working,
    without the limit's pauses, since the switch runs unlimited: a throttled phase 1 must not make the
    switch look as slow as itself."""
    seconds = sum(c.seconds for c in copies)
    working = max(sum(c.working_s for c in copies), 1e-9)
    read = sum(c.bytes_read for c in copies)
    written = sum(c.bytes_written for c in copies)
    return {
        "read_bps": read / working,  # replica read (and the verification's reads)
        "write_bps": max(written, 1) / working,  # production write
        "allocated_bytes": read,
        "seconds": round(seconds, 3),
        "working_s": round(working, 3),
        "limit_held_s": round(sum(c.held_s for c in copies), 3),
        "limit_bps": limit_bps,
    }


def _shutdown(hv, session):
    replica = session.replica
    cap = float(session.shutdown_timeout_s)
    if replica.measured_shutdown_s is not None:
        return min(replica.measured_shutdown_s, cap), "measured on this VM's last switch"
    if hv.power_state(replica.vm_id) != POWERED_ON:
        return 0.0, "the replica is already off"
    if not hv.tools_running(replica.vm_id):
        return 0.0, "no guest tools: it is powered off at once"
    meta = hv.vm_meta(replica.vm_id)  # the lab knows its guest; other platforms say nothing ({})
    if meta.get("shutdown_hangs"):
        return cap, "this lab guest hangs on shutdown: powered off at the timeout"
    if "shutdown_seconds" in meta:
        return min(float(meta["shutdown_seconds"] or 0), cap), "the lab guest's shutdown time"
    return min(float(settings.FAILBACK_PREDICT_SHUTDOWN_S), cap), "the platform default (FAILBACK_PREDICT_SHUTDOWN_S)"


def _power_on(hv, session):
    if not session.power_on_after:
        return 0.0, "the production VM stays off after the switch"
    if session.replica.measured_power_on_s is not None:
        return session.replica.measured_power_on_s, "measured on this VM's last switch"
    name = hv.name
    if name in DEFAULT_POWER_ON_S:
        return DEFAULT_POWER_ON_S[name], f"the {name} default"
    return float(settings.FAILBACK_PREDICT_POWER_ON_S), "the platform default (FAILBACK_PREDICT_POWER_ON_S)"


def pending(hv, session):
    """Per disk: the method phase 2 would use now, why, and the bytes it would send."""
    replica = session.replica
    out = []
    for disk in session.disks.all():
        if hv.transport == "network":
            out.append(
                {
                    "disk": disk.key,
                    "method": "full",
                    "why": "Network transport cannot write ranges: the whole disk is sent again",
                    "pending_bytes": disk.capacity_bytes,
                }
            )
            continue
        current = hv.change_tracking(replica.vm_id, disk.key) if disk.change_id else None
        try:
            extents = hv.changed_areas(replica.vm_id, disk.key, disk.change_id).extents if current else None
        except HypervisorError:  # the recorded id is refused (change tracking reset): phase 2 compares digests
            extents = None
        if extents is not None:
            size = sum(n for _, n in extents)
            out.append(
                {
                    "disk": disk.key,
                    "method": "tracked",
                    "pending_bytes": size,
                    "why": f"Change tracking: {len(extents)} extents changed since the production disk was last brought up to date",
                }
            )
        else:
            guess = int((session.prediction or {}).get("catchup_written", {}).get(disk.key, 0))
            out.append(
                {
                    "disk": disk.key,
                    "method": "digest",
                    "pending_bytes": guess,
                    "why": "Change tracking unavailable on this VM: the replica is read once and block digests compared",
                }
            )
    return out


def _last_measured(session):
    from .models import FailbackSession

    for data in (
        FailbackSession.objects.filter(replica_id=session.replica_id, phase2_ended_at__isnull=False)
        .exclude(pk=session.pk)
        .order_by("-phase2_ended_at")
        .values_list("prediction", flat=True)[:1]
    ):
        measured = (data or {}).get("measured") or {}
        if measured.get("verify_bps"):
            return measured
    return None


def predict(hv, session):
    """The window a switch started now would cause, with its parts and their basis."""
    base = (session.prediction or {}).get("base") or {}
    replica = session.replica
    disks = pending(hv, session)
    changed = sum(d["pending_bytes"] for d in disks)
    allocated = int(base.get("allocated_bytes") or sum(d.capacity_bytes for d in session.disks.all()))
    per_disk_alloc = allocated / max(1, len(disks))
    reads = VERIFY_SAMPLE_BYTES * len(disks) + sum(per_disk_alloc for d in disks if d["method"] == "digest")
    if hv.transport == "network":  # the network copy is verified by reading both whole disks back
        reads = 2 * sum(d["pending_bytes"] for d in disks)
    last = _last_measured(session)
    copy_bps = float(base.get("write_bps") or base.get("copy_bps") or 100e6)
    read_bps = float(base.get("read_bps") or 200e6)
    if last:
        delta_s, verify_s = changed / (replica.measured_delta_bps or copy_bps), reads / last["verify_bps"]
        overhead_s = last.get("overhead_s", 0.0)
        data_basis = "rates and overhead measured on this VM's last switch"
    else:
        delta_s, verify_s, overhead_s = changed / copy_bps, reads / read_bps, 0.0
        data_basis = _phase1_basis(base)
    data_s = delta_s + verify_s + overhead_s
    shutdown_s, shutdown_basis = _shutdown(hv, session)
    power_on_s, power_on_basis = _power_on(hv, session)
    window = shutdown_s + data_s + power_on_s
    return {
        "at": timezone.now().isoformat(),
        "window_s": round(window, 2),
        "shutdown_s": round(shutdown_s, 2),
        "shutdown_basis": shutdown_basis,
        "data_s": round(data_s, 2),
        "data_basis": data_basis,
        "delta_s": round(delta_s, 2),  # the data part's own parts, for the breakdown the session page shows
        "verify_s": round(verify_s, 2),
        "overhead_s": round(overhead_s, 2),
        "changed_bytes": changed,
        "read_bytes": int(reads),
        "power_on_s": round(power_on_s, 2),
        "power_on_basis": power_on_basis,
        "disks": disks,
    }


def _phase1_basis(base):
    if not base.get("read_bps"):
        return "default rates (phase 1 measured none)"
    if base.get("limit_held_s"):
        bps = base.get("limit_bps")
        limit = f"{bps / 2**20:.1f} MiB/s (set as {bps / 1e6:g} MB/s) limit" if bps else "bandwidth limit"
        return (
            f"rates measured in this failback's phase 1 without the {base['limit_held_s']:.1f} s its "
            f"{limit} held it back: the switch runs unlimited"
        )
    return "rates measured in this failback's phase 1"


def learn(session, timing):
    """After a switch: what this VM's next prediction should use. ``timing`` holds the seconds and
    bytes of the final delta and of the verification; the rest of the data part is fixed overhead."""
    from .models import FailbackSession, Replica

    measured = {}
    if session.replica_stop_started_at and session.replica_off_at:
        measured["shutdown_s"] = (session.replica_off_at - session.replica_stop_started_at).total_seconds()
    if session.production_on_at and session.phase2_ended_at:
        measured["power_on_s"] = (session.production_on_at - session.phase2_ended_at).total_seconds()
    if session.replica_off_at and session.phase2_ended_at and timing.get("verify_s"):
        data_s = (session.phase2_ended_at - session.replica_off_at).total_seconds()
        measured["verify_bps"] = timing["verify_bytes"] / timing["verify_s"]
        if timing["delta_bytes"] > 8 << 20:  # too few bytes say nothing about a rate
            measured["delta_bps"] = timing["delta_bytes"] / max(timing["delta_s"], 1e-3)
        measured["overhead_s"] = max(0.0, data_s - timing["delta_s"] - timing["verify_s"])
        measured["delta_s"], measured["verify_s"] = timing["delta_s"], timing["verify_s"]
    if not measured:
        return measured
    FailbackSession.objects.filter(pk=session.pk).update(
        prediction={**(session.prediction or {}), "measured": measured}
    )
    fields = {"measured_shutdown_s": measured.get("shutdown_s"), "measured_power_on_s": measured.get("power_on_s")}
    if "delta_bps" in measured:
        previous = session.replica.measured_delta_bps
        # One switch is one noisy sample (a busy host, a cold cache): blend it with what was known.
        fields["measured_delta_bps"] = (measured["delta_bps"] * previous) ** 0.5 if previous else measured["delta_bps"]
    Replica.objects.filter(pk=session.replica_id).update(**{k: v for k, v in fields.items() if v is not None})
    return measured
