"""Answers to exact repeats of deterministic requests, from Redis: same tenant, model, prompt
tokens and sampling parameters (greedy, or seeded). A sampled request is never looked up or
stored, nor one that asks for logprobs (their objects are not kept). Entries expire after
the configured TTL. A cache that does not answer is a miss, never a failed request."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import msgpack
import redis.asyncio as aioredis
from vllm.sampling_params import SamplingParams, SamplingType

from pdcluster.common.registry import redis_client

logger = logging.getLogger("pdcluster.router.response_cache")

# Fields that shape how an answer is delivered, not what it is.
_DELIVERY_FIELDS = {"output_kind", "stream_interval", "skip_clone", "trace_decode_token_ids"}


@dataclass
class CachedSample:
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: int | str | None
    cumulative_logprob: float | None


def cacheable(params: SamplingParams) -> bool:
    deterministic = params.sampling_type in (SamplingType.GREEDY, SamplingType.RANDOM_SEED)
    return deterministic and params.logprobs is None and params.prompt_logprobs is None


def cache_key(tenant: str, model: str, prompt_ids: list[int], params: SamplingParams) -> str:
    fields = {f: getattr(params, f) for f in params.__struct_fields__ if f not in _DELIVERY_FIELDS}
    described = json.dumps([tenant, model, prompt_ids, fields], sort_keys=True, default=repr)
    return hashlib.sha256(described.encode()).hexdigest()


class ResponseCache:
    def __init__(self, url: str, ttl_s: float, cluster_name: str) -> None:
        # A Redis behind a cut link is a miss after a short wait, not a stalled request.
        self._redis = redis_client(url)
        self._ttl_ms = int(ttl_s * 1000)
        self._prefix = f"pdcluster:{cluster_name}:response:"

    async def get(self, key: str) -> list[CachedSample] | None:
        try:
            found = await self._redis.get(self._prefix + key)
        except aioredis.RedisError as e:
            logger.warning("response cache unreachable, serving without it: %s", e)
            return None
        return [CachedSample(*sample) for sample in msgpack.unpackb(found)] if found else None

    async def put(self, key: str, samples: list[CachedSample]) -> None:
        packed = msgpack.packb([[s.token_ids, s.text, s.finish_reason, s.stop_reason, s.cumulative_logprob] for s in samples])
        try:
            await self._redis.set(self._prefix + key, packed, px=self._ttl_ms)
        except aioredis.RedisError as e:
            logger.warning("response cache unreachable, answer not stored: %s", e)

    async def close(self) -> None:
        await self._redis.aclose()
