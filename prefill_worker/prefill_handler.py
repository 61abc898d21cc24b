"""Prefill role: computes a prompt once and streams its KV to the chosen decode worker.

The engine runs the prompt with max_tokens=1; our connector pushes each layer's KV to
the target's KV endpoint while the next layer computes. The reply carries the first
token, how much of the prompt the prefix cache served, and the prompt's logprobs when the
request asks for them (only the engine that computes the prompt can give them).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc

from pdcluster.common.sample_wire import encode_logprobs
from pdcluster.common.tracing import headers_of
from pdcluster.kv_transfer.connector_metadata import CONSUMER_HOLDS, PRODUCE_TO, TRANSFER_ID
from pdcluster.protos import worker_pb2
from pdcluster.worker.recent_latencies import RecentLatencies
from pdcluster.worker.sampling import INVALID_REQUEST_ERRORS, request_sampling_params

if TYPE_CHECKING:
    from opentelemetry.trace import Span


class PrefillHandler:
    def __init__(self, host) -> None:
        self._host = host
        self._queued_tokens = 0
        self.latencies = RecentLatencies()  # arrival to KV sent, per prompt

    @property
    def queued_prefill_tokens(self) -> int:
        return self._queued_tokens

    def latency_stats(self) -> dict:
        return {"prefill_seconds_p90": self.latencies.p90()}

    async def prefill(self, request: worker_pb2.PrefillRequest, context, span: Span) -> worker_pb2.PrefillReply:
        """`span`: the RPC's, which the engine's request joins."""
        from vllm.inputs import TokensPrompt

        target = request.target
        if not request.request_id or not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required")
        if not target.transfer_id or not target.consumer_endpoint:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target.transfer_id and target.consumer_endpoint are required")
        kv = {TRANSFER_ID: target.transfer_id, PRODUCE_TO: target.consumer_endpoint, CONSUMER_HOLDS: target.consumer_prefix_tokens}
        num_tokens = len(request.prompt_token_ids)
        self._queued_tokens += num_tokens
        arrived = time.monotonic()
        final = None
        try:
            # The one token sampled here is not the answer's: nothing constrains or reports it.
            params = request_sampling_params(
                request.sampling_params, kv, max_tokens=1, min_tokens=0, logprobs=None, structured_outputs=None
            )
            async for out in self._host.engine.generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
                params,
                f"{request.request_id}-prefill",
                priority=request.priority,
                lora_request=self._host.lora.request_for(request.lora),
                trace_headers=headers_of(span) or None,
            ):
                final = out
        except INVALID_REQUEST_ERRORS as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self._queued_tokens -= num_tokens
        if final is None or not final.outputs[0].token_ids:
            await context.abort(grpc.StatusCode.INTERNAL, "the engine returned no output for the prefill")
        self.latencies.add(time.monotonic() - arrived)
        return worker_pb2.PrefillReply(
            first_token_id=final.outputs[0].token_ids[0],
            num_cached_tokens=final.num_cached_tokens or 0,
            prompt_logprobs=encode_logprobs(final.prompt_logprobs),
        )
