"""The router's live view of the workers: membership, health and load.

Each worker's `Stats` is polled every `interval_s`; a worker that does not answer, or is
draining, is not routed to. Between polls the router adds the load it has itself sent
(`inflight`, `pending_prefill_tokens`) so a burst does not all land on one worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from pdcluster.common.periodic import cancel_all, run_periodically
from pdcluster.common.tls import TLSFiles, open_channel
from pdcluster.common.worker_record import ROLES, Role
from pdcluster.protos import worker_pb2, worker_pb2_grpc

logger = logging.getLogger("pdcluster.router.pool")

STATS_TIMEOUT_S = 2.0
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(eq=False)
class WorkerView:
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    stats: worker_pb2.WorkerStats | None = None
    reachable: bool = False
    inflight: int = 0  # requests this router has running on it
    pending_prefill_tokens: int = 0  # prompt tokens this router has sent it, not yet prefilled

    @property
    def role(self) -> Role | None:
        return Role(self.stats.role) if self.stats and self.stats.role in ROLES else None

    @property
    def worker_id(self) -> str:
        return self.stats.worker_id if self.stats else self.address

    @property
    def healthy(self) -> bool:
        return self.reachable and self.stats is not None and not self.stats.draining

    def describe(self) -> dict:
        s = self.stats or worker_pb2.WorkerStats()
        return {
            "id": self.worker_id,
            "role": s.role or None,
            "address": self.address,
            "healthy": self.healthy,
            "pid": s.pid,
            "running": s.running,
            "queued": s.queued,
            "free_kv_blocks": s.free_kv_blocks,
            "total_kv_blocks": s.total_kv_blocks,
            "kv_bytes_sent": s.kv_bytes_sent,
            "kv_bytes_received": s.kv_bytes_received,
            "kv_endpoint": s.kv_endpoint,
            "draining": s.draining,
            "router_inflight": self.inflight,
        }


class WorkerPool:
    def __init__(
        self,
        addresses: list[str] = (),
        interval_s: float = 1.0,
        tls: TLSFiles = TLSFiles(),
        on_departed: Callable[[WorkerView], None] | None = None,
    ) -> None:
        self._workers: dict[str, WorkerView] = {}
        self._tls = tls
        self._interval_s = interval_s
        self._task: asyncio.Task | None = None
        self._on_departed = on_departed  # called with each worker that leaves the membership
        self.set_addresses(addresses)

    def set_addresses(self, addresses) -> None:
        """Adopt a new membership (from the CLI, the controller or the registry); call in the loop."""
        wanted = set(addresses)
        for address in list(self._workers):
            if address not in wanted:
                departed = self._workers.pop(address)
                asyncio.get_running_loop().create_task(departed.channel.close())
                if self._on_departed is not None:
                    self._on_departed(departed)
        for address in wanted - set(self._workers):
            channel = open_channel(address, self._tls, _CHANNEL_OPTIONS)
            self._workers[address] = WorkerView(address, channel, worker_pb2_grpc.WorkerStub(channel))

    def workers(self, role: Role | None = None) -> list[WorkerView]:
        return [w for w in self._workers.values() if role is None or w.role == role]

    def healthy(self, role: Role) -> list[WorkerView]:
        return [w for w in self.workers(role) if w.healthy]

    def ready(self) -> bool:
        return all(self.healthy(role) for role in ROLES)

    def mark_unreachable(self, worker: WorkerView) -> None:
        """A request saw the worker fail: stop routing to it until a poll succeeds again."""
        worker.reachable = False

    async def refresh(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in list(self._workers.values())))

    async def _poll(self, worker: WorkerView) -> None:
        try:
            worker.stats = await worker.stub.Stats(worker_pb2.StatsRequest(), timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if worker.reachable:
                logger.warning("worker %s unreachable: %s", worker.address, e.code().name)
            worker.reachable = False
            return
        if not worker.reachable:
            logger.info("worker %s (%s) is healthy", worker.address, worker.role)
        worker.reachable = True

    async def start(self) -> None:
        await self.refresh()
        self._task = run_periodically(self.refresh, self._interval_s, logger, wait_first=True)

    async def close(self) -> None:
        await cancel_all([self._task])
        await asyncio.gather(*(w.channel.close() for w in self._workers.values()))
