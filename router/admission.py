"""Admission control: a bounded number of running requests and a bounded queue before them.
A freed slot goes to the lowest tenant class first; within a class, tenants take turns (start-
time fair queuing: a tenant's queued requests are tagged 0, 1, 2, ... from the class's current
turn on, so one tenant's burst cannot starve another, and an idle tenant saves no credit);
within a tenant, requests go in vLLM's priority order (lower first), then in arrival order.
Without tenants, every request is one tenant's and the order is vLLM's."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

from pdcluster.router.errors import Overloaded


@dataclass
class _Waiting:
    tenant_class: int
    tenant: str
    turn_tag: int  # the tenant's turn this request waits for
    priority: int
    arrival: int
    turn: asyncio.Future = field(compare=False)  # done when its slot is handed over


class AdmissionGate:
    def __init__(self, max_inflight: int, max_queue: int, metrics) -> None:
        self._max_inflight = max_inflight
        self._free = max_inflight
        self._max_queue = max_queue
        self._queue: list[_Waiting] = []  # a left client's entry stays until a release skips it
        self._arrivals = itertools.count()
        self._waiting = 0  # in the queue and not gone
        self._turn: dict[int, int] = defaultdict(int)  # per class: the turn being served
        self._next_tag: dict[str, int] = defaultdict(int)  # per tenant: the turn its next queued request gets
        self._metrics = metrics

    @property
    def running(self) -> int:
        return self._max_inflight - self._free

    @property
    def queued(self) -> int:
        return self._waiting

    def check(self, n: int = 1) -> None:
        """Refuse at once when `n` more requests would overflow the queue."""
        if self._free <= 0 and self._waiting + n > self._max_queue:
            raise Overloaded(f"the router is at capacity ({self._waiting} requests queued); retry later")

    @contextlib.asynccontextmanager
    async def slot(self, priority: int = 0, tenant: str = "", tenant_class: int = 0):
        self.check()
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            tag = max(self._turn[tenant_class], self._next_tag[tenant])
            self._next_tag[tenant] = tag + 1
            loop = asyncio.get_running_loop()
            await self._wait_turn(_Waiting(tenant_class, tenant, tag, priority, next(self._arrivals), loop.create_future()))
        self._metrics.inflight.inc()
        try:
            yield
        finally:
            self._metrics.inflight.dec()
            self._release()

    async def _wait_turn(self, entry: _Waiting) -> None:
        self._queue.append(entry)
        self._waiting += 1
        self._metrics.queue_depth.inc()
        try:
            await entry.turn  # its slot is handed over by _release
        except asyncio.CancelledError:
            if entry.turn.done() and not entry.turn.cancelled():
                self._release()  # handed a slot just as the client left: pass it on
            else:
                entry.turn.cancel()  # skipped by _release
            raise
        finally:
            self._waiting -= 1
            self._metrics.queue_depth.dec()

    def _release(self) -> None:
        self._queue = [e for e in self._queue if not e.turn.done()]
        if not self._queue:
            self._free += 1
            return
        # Linear scans: the queue is bounded (max_queue).
        first = min(self._queue, key=lambda e: (e.tenant_class, e.turn_tag, e.arrival))
        self._turn[first.tenant_class] = first.turn_tag
        chosen = min((e for e in self._queue if e.tenant == first.tenant), key=lambda e: (e.priority, e.arrival))
        self._queue.remove(chosen)
        chosen.turn.set_result(None)
