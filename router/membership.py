"""Where the router learns which workers exist: a fixed list, the cluster controller, or
the Redis registry (which also carries prefix-cache hints between routers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from pdcluster.common.periodic import cancel_all, run_periodically
from pdcluster.common.registry import HEARTBEAT_TTL_S, RedisRegistry
from pdcluster.common.worker_auth import token_metadata
from pdcluster.router.routing_policy import PrefixIndex
from pdcluster.router.worker_pool import WorkerPool

logger = logging.getLogger("pdcluster.router.membership")


class MembershipFollower:
    """Keeps the pool's membership equal to `source()` (an async list of addresses)."""

    def __init__(self, pool: WorkerPool, source, interval_s: float) -> None:
        self._pool, self._source, self._interval_s = pool, source, interval_s
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self._sync()
        self._tasks.append(run_periodically(self._sync, self._interval_s, logger, wait_first=True))

    async def _sync(self) -> None:
        try:
            addresses = await self._source()
        except Exception as e:  # keep the last membership while the source is away
            logger.warning("membership source failed: %s", e)
            return
        self._pool.set_addresses(addresses)

    def add_task(self, task: asyncio.Task) -> None:
        self._tasks.append(task)

    async def close(self) -> None:
        await cancel_all(self._tasks)


class RestartGrace:
    """A Redis that restarts comes back empty, and each live worker re-announces only at its next
    heartbeat. Until one record lifetime has passed since the restart, a worker missing from the
    listing is kept, so the restart does not take workers (and their running requests) away."""

    def __init__(self, grace_s: float = HEARTBEAT_TTL_S) -> None:
        self._grace_s = grace_s
        self._run_id: str | None = None
        self._restarted_at = float("-inf")
        self._members: list[str] = []

    def members(self, run_id: str, listed: list[str], now: float) -> list[str]:
        if self._run_id is not None and run_id != self._run_id:
            self._restarted_at = now
            logger.warning("the registry restarted; keeping %d workers while they re-announce", len(self._members))
        self._run_id = run_id
        if now - self._restarted_at < self._grace_s:
            listed = sorted(set(self._members) | set(listed))
        self._members = listed
        return listed


def follow_registry(
    pool: WorkerPool, index: PrefixIndex, url: str, cluster_name: str, interval_s: float, follow_token: bool
) -> tuple[MembershipFollower, RedisRegistry]:
    """Membership from the Redis registry, and prefix hints shared with the other routers; with
    `follow_token`, also the cluster token the controller published there."""
    registry = RedisRegistry(url, cluster_name)
    router_id = uuid.uuid4().hex
    grace = RestartGrace()

    async def addresses() -> list[str]:
        token = await registry.token() if follow_token else ""
        if token:  # an empty answer (a Redis that restarted empty) keeps the token known
            pool.metadata = token_metadata(token)
        run_id = await registry.server_run_id()
        return grace.members(run_id, [w.address for w in await registry.workers()], time.monotonic())

    async def publish_hint(worker_id: str, hashes: list[int]) -> None:
        with contextlib.suppress(Exception):  # hints are best effort; Redis may be away
            await registry.publish_prefix(router_id, worker_id, hashes)

    def publish(worker_id: str, hashes: list[int]) -> None:
        asyncio.get_running_loop().create_task(publish_hint(worker_id, hashes))

    async def apply_hints() -> None:
        while True:  # resubscribe after Redis goes away and comes back
            try:
                async for origin, worker_id, hashes in registry.prefix_updates():
                    if origin != router_id:
                        index.record(worker_id, hashes, shared=False)
            except Exception as e:
                logger.warning("prefix hints from the registry stopped (%s); resubscribing", e)
                await asyncio.sleep(interval_s)

    index.on_record = publish
    follower = MembershipFollower(pool, addresses, interval_s)
    follower.add_task(asyncio.create_task(apply_hints()))
    return follower, registry
