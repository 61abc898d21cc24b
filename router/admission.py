"""Admission control: a bounded number of running requests and a bounded queue before them."""

from __future__ import annotations

import asyncio
import contextlib

from pdcluster.router.errors import Overloaded


class AdmissionGate:
    def __init__(self, max_inflight: int, max_queue: int, metrics) -> None:
        self._slots = asyncio.Semaphore(max_inflight)
        self._max_queue = max_queue
        self._waiting = 0
        self._metrics = metrics

    def check(self, n: int = 1) -> None:
        """Refuse at once when `n` more requests would overflow the queue."""
        if self._slots.locked() and self._waiting + n > self._max_queue:
            raise Overloaded(f"the router is at capacity ({self._waiting} requests queued); retry later")

    @contextlib.asynccontextmanager
    async def slot(self):
        self.check()
        self._waiting += 1
        self._metrics.queue_depth.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self._metrics.queue_depth.dec()
        self._metrics.inflight.inc()
        try:
            yield
        finally:
            self._metrics.inflight.dec()
            self._slots.release()
