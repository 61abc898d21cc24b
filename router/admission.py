"""Admission control: a bounded number of running requests and a bounded queue before them,
served in vLLM's priority order (lower first; arrival order within a priority)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools

from pdcluster.router.errors import Overloaded


class AdmissionGate:
    def __init__(self, max_inflight: int, max_queue: int, metrics) -> None:
        self._free = max_inflight
        self._max_queue = max_queue
        self._queue: list[tuple[int, int, asyncio.Future]] = []  # (priority, arrival, woken when its turn comes)
        self._arrivals = itertools.count()
        self._waiting = 0  # in the queue and not gone (a left client's entry stays until popped)
        self._metrics = metrics

    def check(self, n: int = 1) -> None:
        """Refuse at once when `n` more requests would overflow the queue."""
        if self._free <= 0 and self._waiting + n > self._max_queue:
            raise Overloaded(f"the router is at capacity ({self._waiting} requests queued); retry later")

    @contextlib.asynccontextmanager
    async def slot(self, priority: int = 0):
        self.check()
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            await self._wait_turn(priority)
        self._metrics.inflight.inc()
        try:
            yield
        finally:
            self._metrics.inflight.dec()
            self._release()

    async def _wait_turn(self, priority: int) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._arrivals), future))
        self._waiting += 1
        self._metrics.queue_depth.inc()
        try:
            await future  # its slot is handed over by _release
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed a slot just as the client left: pass it on
            else:
                future.cancel()  # skipped by _release
            raise
        finally:
            self._waiting -= 1
            self._metrics.queue_depth.dec()

    def _release(self) -> None:
        while self._queue:
            _, _, future = heapq.heappop(self._queue)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1
