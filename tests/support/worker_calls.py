"""Calling workers directly, as the router does, for tests below the router."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from pdcluster.kv_transfer.grpc_transport import fetch_kv_stats
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc

MAX_TOKENS = 24
# Small chunks so most test prompts span several chunks per layer.
KV_CHUNK_BYTES = 64 * 1024
KV_LOAD_TIMEOUT_S = 20


async def generate(prefill, decode, prompt: list[int], *, prefill_prompt=None, skip_prefill=False, transfer_id=None):
    """Route one greedy request the way the router does: reserve on decode, prefill, stream."""
    rid = uuid.uuid4().hex
    transfer_id = transfer_id or f"kv-{rid}"
    sampling = wpb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0)
    async with grpc.aio.insecure_channel(prefill.address) as pc, grpc.aio.insecure_channel(decode.address) as dc:
        stream = wgrpc.WorkerStub(dc).Decode(
            wpb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling, transfer_id=transfer_id)
        )
        reply = None
        if not skip_prefill:
            reply = await wgrpc.WorkerStub(pc).Prefill(
                wpb.PrefillRequest(
                    request_id=rid,
                    prompt_token_ids=prefill_prompt or prompt,
                    sampling=sampling,
                    target=wpb.KVTransferTarget(transfer_id=transfer_id, consumer_endpoint=decode.kv_endpoint),
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
