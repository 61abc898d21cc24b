"""Decode role: generates a request's tokens, loading its prompt KV from the prefill pool.

With a transfer id the engine reserves blocks for the prompt and waits (bounded) for
the KV the prefill worker pushes; without one it computes the prompt itself (short
prompts, or resuming a request elsewhere from prompt + tokens already sent).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
import msgspec

from pdcluster.common.sample_wire import encode_logprobs
from pdcluster.common.tracing import headers_of
from pdcluster.kv_transfer.connector_metadata import CONSUME, CONSUME_FROM, TRANSFER_ID
from pdcluster.protos import worker_pb2
from pdcluster.worker.recent_latencies import RecentLatencies
from pdcluster.worker.sampling import INVALID_REQUEST_ERRORS, request_sampling_params

if TYPE_CHECKING:
    from opentelemetry.trace import Span


class DecodeHandler:
    def __init__(self, host) -> None:
        self._host = host
        self.latencies = RecentLatencies()  # between output tokens, per token

    @property
    def queued_prefill_tokens(self) -> int:
        return 0

    def latency_stats(self) -> dict:
        return {"itl_seconds_p90": self.latencies.p90()}

    async def decode(self, request: worker_pb2.DecodeRequest, context, span: Span):
        """`span`: the RPC's, which the engine's request joins."""
        from vllm.inputs import TokensPrompt

        if not request.request_id or not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required")
        kv = None
        if request.HasField("transfer_id"):
            kv = {TRANSFER_ID: request.transfer_id, CONSUME: True, CONSUME_FROM: request.producer_kv_endpoint}
        try:
            params = request_sampling_params(request.sampling_params, kv)
            stream = self._host.engine.generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
                params,
                f"{request.request_id}-decode",
                priority=request.priority,
                lora_request=self._host.lora.request_for(request.lora),
                trace_headers=headers_of(span) or None,
                reasoning_ended=request.reasoning_ended if request.HasField("reasoning_ended") else None,
                reasoning_parser_kwargs=msgspec.msgpack.decode(request.reasoning_parser_kwargs)
                if request.reasoning_parser_kwargs
                else None,
            )
            num_output, last = 0, None
            async for out in stream:
                tokens = len(out.outputs[0].token_ids)
                if tokens:
                    now = time.monotonic()
                    if last is not None:
                        self.latencies.add((now - last) / tokens, now)
                    last = now
                yield _chunk(out, num_output := num_output + tokens)
        except INVALID_REQUEST_ERRORS as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def _chunk(out, num_output: int) -> worker_pb2.DecodeChunk:
    """One engine step of the request (vLLM's DELTA RequestOutput) on the wire."""
    completion = out.outputs[0]
    chunk = worker_pb2.DecodeChunk(
        token_ids=completion.token_ids,
        text=completion.text,
        finish_reason=completion.finish_reason or "",
        num_prompt_tokens=len(out.prompt_token_ids or ()),
        num_output_tokens=num_output,
        num_cached_tokens=out.num_cached_tokens or 0,
        logprobs=encode_logprobs(completion.logprobs),
        prompt_logprobs=encode_logprobs(out.prompt_logprobs),
        cumulative_logprob=completion.cumulative_logprob or 0.0,
    )
    if isinstance(completion.stop_reason, str):
        chunk.stop_string = completion.stop_reason
    elif completion.stop_reason is not None:
        chunk.stop_token_id = completion.stop_reason
    return chunk
