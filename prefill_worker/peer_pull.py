"""A prefill worker's pull of a prompt prefix from a peer worker that holds it (the router's
`PeerPull`): the peer runs the prefix (from its own cache, but the last block) with its KV
sent here (Worker.SendPrefix), while this engine waits for those blocks as a decode engine
waits for a prompt's, then computes only the rest.

A pull never costs the request: if the peer refuses, fails or dies, the transfer is aborted
here (or the peer's KV endpoint is found gone) and vLLM recomputes the prefix (the
connector's `kv_load_failure_policy="recompute"`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from vllm import SamplingParams

from pdcluster.common.sample_wire import encode_sampling_params
from pdcluster.common.tls import open_channel
from pdcluster.common.tracing import with_trace
from pdcluster.common.worker_auth import token_metadata
from pdcluster.kv_transfer.connector_metadata import PULL_FROM, PULL_ID, PULL_TOKENS
from pdcluster.kv_transfer.kv_transfer_service import KVClient
from pdcluster.protos import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger(__name__)

PULL_TIMEOUT_S = 60.0  # the peer's request, queue included; a frozen peer is found lost sooner by the KV watch
_ONE_TOKEN = encode_sampling_params(SamplingParams(max_tokens=1))


class PeerPulls:
    def __init__(self, host) -> None:
        self._host = host
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._kv: KVClient | None = None

    def start(self, request: worker_pb2.PrefillRequest, params: SamplingParams, span: Span) -> asyncio.Task | None:
        """Ask the request's peer for its prefix and have the engine load it (`params` gain the
        pull), or None where nothing is worth pulling: fewer whole blocks than this worker holds,
        or prompt logprobs asked for (vLLM computes those from the whole prompt)."""
        pull = request.pull
        block = self._host.engine.vllm_config.cache_config.block_size
        tokens = min(pull.tokens, len(request.prompt_token_ids) - 1) // block * block
        if not pull.worker or tokens <= pull.held_tokens or params.prompt_logprobs is not None:
            return None
        pull_id = f"{request.target.transfer_id}-pull"
        assert params.extra_args is not None  # production_params set kv_transfer_params
        params.extra_args["kv_transfer_params"].update({PULL_ID: pull_id, PULL_TOKENS: tokens, PULL_FROM: pull.kv_endpoint})
        message = worker_pb2.PrefillRequest(
            request_id=pull_id,
            prompt_token_ids=request.prompt_token_ids[:tokens],
            target=worker_pb2.KVTransferTarget(
                transfer_id=pull_id, consumer_endpoint=self._host.kv_endpoint, consumer_prefix_tokens=pull.held_tokens
            ),
            sampling_params=_ONE_TOKEN,
            priority=request.priority,
            lora=request.lora if request.HasField("lora") else None,
        )
        return asyncio.create_task(self._fetch(pull.worker, message, span))

    async def _fetch(self, peer: str, message: worker_pb2.PrefillRequest, span: Span) -> None:
        metadata = with_trace(token_metadata(self._host.config.auth_token), span)
        try:
            await worker_pb2_grpc.WorkerStub(self._channel(peer)).SendPrefix(message, metadata=metadata, timeout=PULL_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and (channel := self._channels.pop(peer, None)) is not None:
                await channel.close()  # a peer that left: the router names its replacement by another address
            reason = f"peer {peer} did not send the prefix: {e.code().name} {e.details()}"
            logger.warning("pull %s: %s; computing it here", message.request_id, reason)
            await self._kv_client().abort(self._host.kv_endpoint, message.request_id, reason)

    def _channel(self, peer: str) -> grpc.aio.Channel:
        if peer not in self._channels:
            self._channels[peer] = open_channel(peer, self._host.config.tls)
        return self._channels[peer]

    def _kv_client(self) -> KVClient:
        if self._kv is None:
            self._kv = KVClient(self._host.kv_settings)
        return self._kv
