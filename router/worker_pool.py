"""The router's live view of the workers: membership, health and load.

Each worker's `Stats` is polled every `interval_s`; a worker that is draining, or misses
`unhealthy_after` checks in a row, is not routed to, and is `lost`: requests waiting on it
stop waiting. Between polls the router adds the load it has itself sent (`WorkerLoad`), so
a burst does not all land on one worker. The view is plain state, which routing policies
read and the simulator builds without a process behind it; the channel and stub sit on the
pool's `WorkerConnection`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from pdcluster.common.periodic import cancel_all, run_periodically
from pdcluster.common.tls import TLSFiles, open_channel
from pdcluster.common.worker_record import ROLES, Role
from pdcluster.protos import worker_pb2, worker_pb2_grpc
from pdcluster.router import cluster_view
from pdcluster.router.worker_load import WorkerLoad

logger = logging.getLogger("pdcluster.router.pool")

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(eq=False)
class WorkerConnection:
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub


@dataclass(eq=False)
class WorkerView:
    address: str
    stats: worker_pb2.WorkerStats | None = None
    reachable: bool = False
    missed_polls: int = 0  # health checks in a row without an answer
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set when it stops answering
    load: WorkerLoad = field(default_factory=WorkerLoad)
    connection: WorkerConnection | None = None  # None in the simulator and in policy tests
    # Its start as this router saw it (wall clock; 0 until it happens): it became a member,
    # was first sent a request, and a request on it first had a token.
    joined_at: float = field(default_factory=time.time)
    first_routed_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def stub(self) -> worker_pb2_grpc.WorkerStub:
        assert self.connection is not None, f"{self.address} has no connection"
        return self.connection.stub

    @property
    def role(self) -> Role | None:
        return Role(self.stats.role) if self.stats and self.stats.role in ROLES else None

    @property
    def worker_id(self) -> str:
        return self.stats.worker_id if self.stats else self.address

    @property
    def healthy(self) -> bool:
        return self.reachable and self.stats is not None and not self.stats.draining

    def describe(self) -> cluster_view.WorkerSummary:
        s = self.stats or worker_pb2.WorkerStats()
        return cluster_view.WorkerSummary(
            id=self.worker_id,
            role=s.role or None,
            address=self.address,
            metrics_port=s.metrics_port,
            healthy=self.healthy,
            pid=s.pid,
            running=s.running,
            queued=s.queued,
            free_kv_blocks=s.free_kv_blocks,
            total_kv_blocks=s.total_kv_blocks,
            kv_bytes_sent=s.kv_bytes_sent,
            kv_bytes_received=s.kv_bytes_received,
            kv_endpoint=s.kv_endpoint,
            kv_transport=s.kv_transport,
            kv_bytes_by_transport=dict(s.kv_bytes_by_transport),
            kv_transfers_by_transport=dict(s.kv_transfers_by_transport),
            draining=s.draining,
            router_inflight=self.load.inflight,
            lora_adapters=list(s.lora_adapters),
            kv_compatibility=dict(s.kv_compatibility),
            joined_at=self.joined_at,
            first_routed_at=self.first_routed_at,
            first_token_at=self.first_token_at,
        )


def queued_prefill_tokens(worker: WorkerView) -> int:
    """Prompt tokens ahead of a new prompt on a worker: its count, or ours if the poll lags."""
    return max(worker.stats.queued_prefill_tokens, worker.load.pending_prefill_tokens)


class WorkerPool:
    def __init__(
        self,
        addresses: Sequence[str] = (),
        interval_s: float = 1.0,
        tls: TLSFiles = TLSFiles(),
        on_departed: Callable[[WorkerView], None] | None = None,
        health_timeout_s: float = 2.0,
        unhealthy_after: int = 2,
    ) -> None:
        self._workers: dict[str, WorkerView] = {}
        self._tls = tls
        self._interval_s = interval_s
        self._health_timeout_s = health_timeout_s
        self._unhealthy_after = unhealthy_after
        self._pollers: dict[str, asyncio.Task] = {}
        self._started = False
        self._on_departed = on_departed  # called with each worker that leaves the membership
        self.metadata: tuple[tuple[str, str], ...] = ()  # sent with every Worker call (the cluster token)
        self.set_addresses(addresses)

    def set_addresses(self, addresses) -> None:
        """Adopt a new membership (from the CLI, the controller or the registry); call in the loop."""
        wanted = set(addresses)
        for address in list(self._workers):
            if address not in wanted:
                departed = self._workers.pop(address)
                poller = self._pollers.pop(address, None)
                if poller is not None:
                    poller.cancel()
                departed.lost.set()  # requests still on it go elsewhere
                asyncio.get_running_loop().create_task(departed.connection.channel.close())
                if self._on_departed is not None:
                    self._on_departed(departed)
        for address in wanted - set(self._workers):
            channel = open_channel(address, self._tls, _CHANNEL_OPTIONS)
            self._workers[address] = WorkerView(address, connection=WorkerConnection(channel, worker_pb2_grpc.WorkerStub(channel)))
            if self._started:  # a worker that just joined: health-check it now, not an interval from now
                self._start_polling(self._workers[address], wait_first=False)

    def workers(self, role: Role | None = None) -> list[WorkerView]:
        return [w for w in self._workers.values() if role is None or w.role == role]

    def healthy(self, role: Role) -> list[WorkerView]:
        return [w for w in self.workers(role) if w.healthy]

    def ready(self) -> bool:
        """A healthy decode worker, and a healthy prefill worker unless the cluster has none
        (co-located engines: decode workers compute the prompts)."""
        return bool(self.healthy(Role.DECODE)) and (bool(self.healthy(Role.PREFILL)) or not self.workers(Role.PREFILL))

    def mark_unreachable(self, worker: WorkerView) -> None:
        """A request saw the worker fail: stop routing to it until a poll succeeds again."""
        worker.reachable = False

    async def refresh(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in list(self._workers.values())))

    async def _poll(self, worker: WorkerView) -> None:
        try:
            stats = await worker.stub.Stats(worker_pb2.StatsRequest(), timeout=self._health_timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            # One slow answer is a busy CPU; several in a row (or a refused connection) are a
            # worker that is gone or frozen: stop routing to it, and move the requests it holds.
            worker.missed_polls += 1
            if worker.missed_polls >= self._unhealthy_after and not worker.lost.is_set():
                logger.warning("worker %s lost: %s on %d health checks in a row", worker.address, e.code().name, worker.missed_polls)
                worker.reachable = False
                worker.lost.set()
            return
        worker.stats, worker.missed_polls = stats, 0
        if not worker.reachable or worker.lost.is_set():
            logger.info("worker %s (%s) is healthy", worker.address, worker.role)
            worker.lost = asyncio.Event()
        worker.reachable = True

    def _start_polling(self, worker: WorkerView, wait_first: bool = True) -> None:
        # One loop per worker, so a frozen worker's slow checks do not delay the others'.
        self._pollers[worker.address] = run_periodically(lambda: self._poll(worker), self._interval_s, logger, wait_first=wait_first)

    async def start(self) -> None:
        await self.refresh()
        self._started = True
        for worker in self._workers.values():
            self._start_polling(worker)

    async def close(self) -> None:
        await cancel_all(self._pollers.values())
        await asyncio.gather(*(w.connection.channel.close() for w in self._workers.values()))
