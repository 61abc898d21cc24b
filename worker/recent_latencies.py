"""A worker's recent latencies: what it observes of the SLOs its pool serves, for the
controller's SLO autoscaling."""

from __future__ import annotations

import collections
import time

from pdcluster.common.percentiles import percentile

HORIZON_S = 30.0
MAX_SAMPLES = 4096


class RecentLatencies:
    """Samples of the last `horizon_s` seconds (at most MAX_SAMPLES), and their 90th percentile."""

    def __init__(self, horizon_s: float = HORIZON_S) -> None:
        self._horizon_s = horizon_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=MAX_SAMPLES)

    def add(self, seconds: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, seconds))

    def p90(self, now: float | None = None) -> float:
        """0 without samples in the horizon: nothing was served, so nothing was late."""
        now = time.monotonic() if now is None else now
        while self._samples and self._samples[0][0] < now - self._horizon_s:
            self._samples.popleft()
        return percentile([v for _, v in self._samples], 0.9) if self._samples else 0.0
