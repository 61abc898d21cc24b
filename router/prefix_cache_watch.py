"""The router follows each worker's prefix cache into its prefix index.

A worker mirrors its engine's KV cache events (`WatchPrefixCache`: a snapshot, then each
block stored or evicted, named as the router names a prompt's blocks). With them the index
knows what a worker really holds: blocks it evicted, prompts other routers sent it, an engine
that restarted empty; on a decode worker, a conversation's earlier turns, answers included.
The router still records its own choices of prefill worker at once, since the events for a
prompt come only once it has been computed.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pdcluster.common.periodic import cancel_all, run_periodically
from pdcluster.protos import worker_pb2
from pdcluster.router.routing_policy import PrefixIndex
from pdcluster.router.worker_pool import WorkerPool, WorkerView

logger = logging.getLogger("pdcluster.router.prefix_cache")


class PrefixCacheWatch:
    def __init__(self, pool: WorkerPool, index: PrefixIndex, interval_s: float) -> None:
        self._pool = pool
        self._index = index
        self._interval_s = interval_s
        self._streams: dict[str, asyncio.Task] = {}  # worker address -> its watch
        self._loop: asyncio.Task | None = None

    def start(self) -> None:
        self._loop = run_periodically(self._sync, self._interval_s, logger)

    async def close(self) -> None:
        await cancel_all([self._loop, *self._streams.values()])
        self._streams.clear()

    async def _sync(self) -> None:
        """Watch each worker the pool knows; stop watching those it no longer does."""
        workers = {w.address: w for w in self._pool.workers()}
        for address in set(self._streams) - set(workers):
            self._streams.pop(address).cancel()
        for address, worker in workers.items():
            if address not in self._streams:
                self._streams[address] = asyncio.create_task(self._watch(worker))

    async def _watch(self, worker: WorkerView) -> None:
        while True:
            try:
                async for update in worker.stub.WatchPrefixCache(worker_pb2.WatchPrefixCacheRequest(), metadata=self._pool.metadata):
                    self._apply(worker.worker_id, update)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    logger.info("worker %s publishes no KV events: routing to it by guessed prefixes", worker.address)
                    return
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    logger.warning("prefix-cache events from %s: %s", worker.address, e.details())
            # Stream over (worker restarting, or this router fell behind): start again from a snapshot.
            await asyncio.sleep(self._interval_s)

    def _apply(self, worker_id: str, update: worker_pb2.PrefixCacheUpdate) -> None:
        if update.reset:
            self._index.forget(worker_id)
        self._index.record(worker_id, list(update.stored), shared=False)
        self._index.remove(worker_id, update.removed)
        self._index.update_tier(worker_id, update.tier_stored, update.tier_removed)
