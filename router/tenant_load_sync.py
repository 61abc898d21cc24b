"""Tenant limits across the routers that share a registry. Each router publishes what its
tenants' requests hold (requests running or queued, tokens per second over the last minute)
on a Redis channel as soon as a request starts or ends, and at least every HEARTBEAT_S; each
adds up the others' last words. A tenant's `max_concurrent` and `tokens_per_minute` then hold
for the cluster, not once per router, behind by one message's trip (the tokens by up to a
heartbeat). A router silent for TTL_S (gone, or cut off) counts no more; one that stops says
so. A registry that does not answer leaves each router to its own counts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import msgpack
import redis.asyncio as aioredis

from pdcluster.common.registry import redis_client
from pdcluster.router.tenants import Elsewhere, Tenants

logger = logging.getLogger("pdcluster.router.tenant_load")

HEARTBEAT_S = 1.0
TTL_S = 5.0
CLOSE_WAIT_S = 2.0


class TenantLoadSync:
    def __init__(self, url: str, cluster_name: str, tenants: Tenants) -> None:
        self._redis = redis_client(url)
        self._channel = f"pdcluster:{cluster_name}:tenant-load"
        self._id = uuid.uuid4().hex
        self._tenants = tenants
        self._changed = asyncio.Event()
        self._heard: dict[str, tuple[float, dict]] = {}  # router id -> (when, its load)
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    def start(self) -> None:
        self._tenants.on_change = self._changed.set
        self._tasks = [asyncio.create_task(self._publish_changes()), asyncio.create_task(self._listen())]

    async def close(self) -> None:
        self._closed = True  # the loops end even where a client library swallows a cancellation
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_WAIT_S)
        with contextlib.suppress(aioredis.RedisError):  # its share is gone at once, not after TTL_S
            await self._redis.publish(self._channel, msgpack.packb([self._id, None]))
        await self._redis.aclose()

    async def publish(self) -> None:
        now = time.time()
        load = {name: [self._tenants.open[name], self._tenants.token_buckets(name, now)] for name in self._tenants.limited}
        await self._redis.publish(self._channel, msgpack.packb([self._id, load]))

    def heard(self, router_id: str, load: dict | None, now: float) -> None:
        """Another router's word (None: it stopped), at monotonic `now`."""
        if router_id == self._id:
            return
        if load is None:
            self._heard.pop(router_id, None)
        else:
            self._heard[router_id] = (now, load)
        self._recount(now)

    def _recount(self, now: float) -> None:
        self._heard = {r: (at, load) for r, (at, load) in self._heard.items() if now - at < TTL_S}
        elsewhere = Elsewhere()
        for _, load in self._heard.values():
            for name, (held, buckets) in load.items():
                elsewhere.open[name] += held
                elsewhere.tokens.setdefault(name, []).extend((second, tokens) for second, tokens in buckets)
        self._tenants.elsewhere = elsewhere

    async def _publish_changes(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_S):
                    await self._changed.wait()
            await asyncio.sleep(0)  # the starts and ends of this turn of the loop go out as one message
            self._changed.clear()
            with contextlib.suppress(aioredis.RedisError):  # the listener says so; the next heartbeat catches up
                await self.publish()

    async def _listen(self) -> None:
        listening = True  # warn once per outage, not once per retry
        while not self._closed:  # subscribe again after Redis goes away and comes back
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                listening = True
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=HEARTBEAT_S)
                    if message is not None:
                        router_id, load = msgpack.unpackb(message["data"])
                        self.heard(router_id, load, time.monotonic())
                    else:
                        self._recount(time.monotonic())  # the silent drop out
            except Exception as e:  # Redis away, or a word this router cannot read: its limits go on locally
                if self._closed:
                    break
                if listening:
                    logger.warning("tenant loads from the registry stopped (%s); other routers' requests count until %.0f s old", e, TTL_S)
                listening = False
                self._recount(time.monotonic())
                await asyncio.sleep(HEARTBEAT_S)
            finally:
                with contextlib.suppress(aioredis.RedisError):
                    await pubsub.aclose()
