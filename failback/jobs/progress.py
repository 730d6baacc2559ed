"""The engine's progress, as the session's page sees it: saved fields, throughput samples, nudges."""

import time

from django.utils import timezone

from .. import broadcast
from ..models import FailbackSession
from .runs import LeaseLost, _save

SAMPLE_EVERY = 1.0  # seconds between throughput samples kept for the chart
MAX_SAMPLES = 2000


class ProgressSink:
    """Receives the engine's (already rate-bounded) progress; saves the fields it changes and nudges.

    It also notices a cancel or a switch: when the session has left ``expect``, it sets ``cancel``
    and the engine stops at once, its checkpoint intact. ``busy_s`` is the time spent here, which a
    rate of the data work leaves out (it grows with the wall time, so with a bandwidth limit's pauses)."""

    def __init__(self, disk, *, expect, cancel, run, show=True):
        self.disk, self.expect, self.cancel, self.run, self.show = disk, expect, cancel, run, show
        self.samples = list(
            FailbackSession.objects.filter(pk=disk.session_id).values_list("throughput", flat=True).first() or []
        )
        self.last_sample = 0.0
        self.busy_s = 0.0

    def __call__(self, p):
        started = time.monotonic()
        try:
            self._report(p)
        finally:
            self.busy_s += time.monotonic() - started

    def _report(self, p):
        fields = {"heartbeat_at": timezone.now()}
        if self.run.lost:
            return
        if self.show:
            try:
                _save(
                    self.disk,
                    self.run,
                    bytes_total=p.bytes_total,
                    bytes_done=p.bytes_done,
                    bytes_written=p.bytes_written,
                    rate_bps=p.rate_bps,
                    eta_s=p.eta_seconds,
                )
            except LeaseLost:
                self.cancel.set()  # the engine stops at its next block; the run then raises LeaseLost
                return
            now = time.time()
            # A pass's last report is always kept: a pass shorter than a sample interval would leave
            # only its first (rate 0) and the chart would disagree with the rate column.
            if now - self.last_sample >= SAMPLE_EVERY or p.bytes_done >= p.bytes_total:
                self.last_sample = now
                self.samples = (self.samples + [[round(now, 1), round(p.rate_bps), self.disk.phase]])[-MAX_SAMPLES:]
                fields["throughput"] = self.samples
        self.run.checked = time.monotonic()
        if not self.run.mine().filter(status=self.expect).update(**fields):
            self.run.lost = not self.run.mine().exists()
            self.cancel.set()
        if self.show:
            broadcast.send_now(self.disk.session_id)
