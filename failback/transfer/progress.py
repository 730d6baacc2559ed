"""Progress reports at a bounded rate, the bandwidth limiter, and the time the limiter held work back."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    bytes_total: int  # bytes this pass has to process (allocated bytes for full; bytes to read for delta)
    bytes_done: int
    bytes_written: int
    rate_bps: float  # recent rate of bytes_done, over the last few seconds
    eta_seconds: float | None  # None until a rate is known


class Reporter:
    """Calls ``callback`` at most once per ``interval`` (plus the first and the final call).

    The rate is measured over a sliding window of a few seconds, so the ETA neither jumps with each
    block nor lags for minutes behind a change of speed.
    """

    def __init__(
        self, total: int, callback: Callable[[Progress], None] | None, interval: float, window: float = 3.0
    ) -> None:
        self.total = total
        self.callback = callback
        self.interval = max(interval, 0.0)
        self.window = max(window, 4 * self.interval)
        self.done = 0
        self.written = 0
        now = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(now, 0)])
        self._last_emit = float("-inf")

    def rate(self, now: float) -> float:
        samples = self._samples
        if now - samples[-1][0] >= min(self.interval, 0.25) or len(samples) == 1:
            samples.append((now, self.done))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()
        t0, d0 = samples[0]
        return (self.done - d0) / (now - t0) if now > t0 else 0.0

    def maybe_emit(self) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if now - self._last_emit < self.interval:
            return
        self._emit(now, final=False)

    def final(self) -> None:
        if self.callback is not None:
            self.done = self.total
            self._emit(time.monotonic(), final=True)

    def _emit(self, now: float, *, final: bool) -> None:
        self._last_emit = now
        rate = self.rate(now)
        remaining = self.total - self.done
        eta = 0.0 if final or remaining <= 0 else (remaining / rate if rate > 0 else None)
        assert self.callback is not None
        self.callback(Progress(self.total, self.done, self.written, rate, eta))


class Pacer:
    """Keeps written bytes at or under ``limit_bps`` averaged over any stretch of work.

    A virtual clock advances by n/limit per n bytes; a writer ahead of it sleeps. After an idle
    stretch (nothing to write) the clock may lag real time by at most ``burst`` seconds, so a long run
    of unchanged blocks does not buy a long burst afterwards.
    """

    def __init__(
        self,
        limit_bps: float | None,
        burst: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if limit_bps is not None and limit_bps <= 0:
            raise ValueError("bandwidth_limit_bps must be positive")
        self.limit = limit_bps
        self.burst = burst
        self.now = clock  # the engine sleeps with these two, so a test can run the limiter on its own clock
        self._sleep = sleep
        self._clock = clock()
        self.paused = 0.0  # seconds this pacer slept to hold its writer back, on its own clock

    def sleep(self, seconds: float) -> None:
        """Hold the writer back; the time slept counts as paused, here and in the thread's :func:`paused` meter."""
        before = self.now()
        try:
            self._sleep(seconds)
        finally:
            spent = max(0.0, self.now() - before)
            self.paused += spent
            meter = getattr(_meters, "current", None)
            if meter is not None:
                meter.seconds += spent

    @property
    def active(self) -> bool:
        return self.limit is not None

    def chunk_size(self, block_size: int) -> int:
        """Write granularity: about 20 writes a second when limited, so the rate is smooth."""
        if self.limit is None:
            return block_size
        return int(max(64 << 10, min(block_size, self.limit / 20)))

    def delay_after(self, nbytes: int) -> float:
        """Account for nbytes just written; seconds to wait before writing more."""
        if self.limit is None:
            return 0.0
        now = self.now()
        self._clock = max(self._clock, now - self.burst) + nbytes / self.limit
        return self._clock - now


class PauseMeter:
    """Seconds the pacers made the measuring thread sleep: see :func:`paused`."""

    def __init__(self) -> None:
        self.seconds = 0.0


_meters = threading.local()


@contextmanager
def paused() -> Iterator[PauseMeter]:
    """Measure the time the bandwidth limiter holds back the passes run in this thread.

    A pass's ``CopyResult.seconds`` is wall time, limit included; that time minus ``meter.seconds`` (and
    minus the time its progress callback took, which grows with the wall time) is the time it spent
    working: reading, writing, hashing, the figure a rate that holds without the limit is computed from.
    Pacers sleep in the thread that runs the pass, so the meter is per thread; an outer meter also counts
    what an inner one measured."""
    meter = PauseMeter()
    outer = getattr(_meters, "current", None)
    _meters.current = meter
    try:
        yield meter
    finally:
        _meters.current = outer
        if outer is not None:
            outer.seconds += meter.seconds
