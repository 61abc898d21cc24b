"""The shared worker registry in Redis: workers announce themselves under a TTL, so a dead
one drops out on its own; routers list the live ones and share prefix-cache hints.

Keys: `pdcluster:{cluster}:workers:{worker_id}` (a WorkerRecord as JSON, expires unless refreshed);
channel `pdcluster:{cluster}:prefix` (msgpack [router_id, worker_id, block hashes]).
"""

from __future__ import annotations

import secrets

import msgpack
import redis.asyncio as aioredis

from pdcluster.common.worker_record import WorkerRecord

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_S = 5.0
# A command on a connection whose peer vanished (a cut link) fails after this, instead of
# waiting for TCP to give up; the next one reconnects. Blocking reads of the prefix channel
# are exempt (redis-py waits on them without a timeout).
REDIS_TIMEOUT_S = 2.0


def redis_client(url: str) -> aioredis.Redis:
    """An asyncio Redis client whose commands fail after REDIS_TIMEOUT_S."""
    return aioredis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)


class RedisRegistry:
    def __init__(self, url: str, cluster_name: str = "pdcluster") -> None:
        self._redis = redis_client(url)
        self._prefix = f"pdcluster:{cluster_name}"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._prefix}:workers:{worker_id}"

    async def announce(self, record: WorkerRecord, ttl_s: float = HEARTBEAT_TTL_S) -> None:
        await self._redis.set(self._worker_key(record.worker_id), record.model_dump_json(), px=int(ttl_s * 1000))

    async def withdraw(self, worker_id: str) -> None:
        await self._redis.delete(self._worker_key(worker_id))

    async def publish_token(self, token: str) -> None:
        """The cluster's shared secret, for routers that join through the registry."""
        await self._redis.set(f"{self._prefix}:token", token)

    async def token(self) -> str:
        token = await self._redis.get(f"{self._prefix}:token")
        return token.decode() if isinstance(token, bytes) else token or ""

    async def shared_token(self) -> str:
        """The token kept here; the first process that needs one makes it."""
        await self._redis.set(f"{self._prefix}:token", secrets.token_urlsafe(32), nx=True)
        return await self.token()

    async def server_run_id(self) -> str:
        """Redis's id for this run of its server: it changes when Redis restarts (empty here)."""
        return (await self._redis.info("server"))["run_id"]

    async def workers(self) -> list[WorkerRecord]:
        keys = [k async for k in self._redis.scan_iter(match=self._worker_key("*"), count=500)]
        if not keys:
            return []
        return [WorkerRecord.model_validate_json(v) for v in await self._redis.mget(keys) if v is not None]

    async def publish_prefix(self, router_id: str, worker_id: str, hashes: list[int]) -> None:
        await self._redis.publish(f"{self._prefix}:prefix", msgpack.packb([router_id, worker_id, hashes]))

    async def prefix_updates(self):
        """Yield (router_id, worker_id, hashes) as routers publish them."""
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(f"{self._prefix}:prefix")
        try:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    router_id, worker_id, hashes = msgpack.unpackb(message["data"])
                    yield router_id, worker_id, hashes
        finally:
            await pubsub.aclose()

    async def close(self) -> None:
        await self._redis.aclose()
