"""Calling workers directly, as the router does, for tests below the router."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from pdcluster.common.cluster_token import local_cluster_token
from pdcluster.common.sample_wire import encode_sampling_params
from pdcluster.common.worker_auth import token_metadata
from pdcluster.kv_transfer.kv_transfer_service import fetch_kv_stats
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc


def _with_local_token(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """Adds the token workers started by hand on this machine share (pdcluster/common/cluster_token.py)."""
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *token_metadata(local_cluster_token("pdcluster")))
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under its first matching kind only: one object per kind.
class _UnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_local_token(details), request)


class _StreamToken(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_local_token(details), request)


def worker_channel(address: str) -> grpc.aio.Channel:
    """A channel to a worker started by tests, which requires the cluster token."""
    return grpc.aio.insecure_channel(address, interceptors=[_UnaryToken(), _StreamToken()])


MAX_TOKENS = 24
# Small chunks so most test prompts span several chunks per layer.
KV_CHUNK_BYTES = 64 * 1024
KV_LOAD_TIMEOUT_S = 20


def greedy_params(max_tokens: int) -> bytes:
    """vLLM SamplingParams for a greedy request, as the router sends them."""
    from vllm import SamplingParams

    return encode_sampling_params(SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def generate(
    prefill, decode, prompt: list[int], *, prefill_prompt=None, skip_prefill=False, transfer_id=None, decode_holds=0, pull=None
):
    """Route one greedy request the way the router does: reserve on decode, prefill, stream.
    `decode_holds`: prompt tokens the router would believe the decode worker holds; `pull`: a
    `PeerPull` for the prefill worker; `prefill` None: the decode worker computes the prompt."""
    rid = uuid.uuid4().hex
    transfer_id = None if prefill is None else transfer_id or f"kv-{rid}"
    sampling = greedy_params(MAX_TOKENS)
    async with worker_channel(decode.address) as dc:
        stream = wgrpc.WorkerStub(dc).Decode(
            wpb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=sampling, transfer_id=transfer_id)
        )
        reply = None
        if prefill is not None and not skip_prefill:
            async with worker_channel(prefill.address) as pc:
                reply = await wgrpc.WorkerStub(pc).Prefill(
                    wpb.PrefillRequest(
                        request_id=rid,
                        prompt_token_ids=prefill_prompt or prompt,
                        sampling_params=sampling,
                        target=wpb.KVTransferTarget(
                            transfer_id=transfer_id, consumer_endpoint=decode.kv_endpoint, consumer_prefix_tokens=decode_holds
                        ),
                        pull=pull,
                    )
                )
        tokens: list[int] = []
        finish = ""
        async for chunk in stream:
            tokens.extend(chunk.token_ids)
            finish = chunk.finish_reason or finish
    assert finish in ("length", "stop")
    return tokens, reply, transfer_id


def kv_stats(worker):
    return asyncio.run(fetch_kv_stats(worker.kv_endpoint))


def worker_stats(address: str) -> wpb.WorkerStats:
    """A worker's own Stats, as it reports them."""

    async def call():
        async with worker_channel(address) as channel:
            return await wgrpc.WorkerStub(channel).Stats(wpb.StatsRequest(), timeout=10)

    return asyncio.run(call())


async def prefix_cache_snapshot(address: str) -> wpb.PrefixCacheUpdate:
    """What a prefill worker tells a router its engine cache and host KV tier hold now."""
    async with worker_channel(address) as channel:
        stream = wgrpc.WorkerStub(channel).WatchPrefixCache(wpb.WatchPrefixCacheRequest())
        async for update in stream:
            stream.cancel()
            return update
    raise RuntimeError(f"{address} ended its prefix-cache stream before the snapshot")
