"""A prompt run on this engine to produce its KV for another engine (one token sampled): a
prefill worker's Prefill, and any worker's SendPrefix for a peer that pulls a prefix it holds.

Our connector pushes each layer's KV to the target's KV endpoint while the next layer
computes; what this engine holds in its prefix cache is not computed again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from pdcluster.common.sample_wire import encode_logprobs
from pdcluster.common.tracing import headers_of
from pdcluster.kv_transfer.connector_metadata import CONSUMER_HOLDS, PRODUCE_TO, TRANSFER_ID
from pdcluster.protos import worker_pb2
from pdcluster.worker.sampling import INVALID_REQUEST_ERRORS, request_sampling_params

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from vllm import SamplingParams


async def production_params(request: worker_pb2.PrefillRequest, context) -> SamplingParams:
    """The engine's params for the request (one token, its KV to the target), or the call
    aborted with INVALID_ARGUMENT and why."""
    target = request.target
    if not request.request_id or not request.prompt_token_ids:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required")
    if not target.transfer_id or not target.consumer_endpoint:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target.transfer_id and target.consumer_endpoint are required")
    kv = {TRANSFER_ID: target.transfer_id, PRODUCE_TO: target.consumer_endpoint, CONSUMER_HOLDS: target.consumer_prefix_tokens}
    try:
        # The one token sampled here is not the answer's: nothing constrains or reports it.
        return request_sampling_params(request.sampling_params, kv, max_tokens=1, min_tokens=0, logprobs=None, structured_outputs=None)
    except INVALID_REQUEST_ERRORS as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        raise  # not reached: abort raises


async def produce_kv(host, request: worker_pb2.PrefillRequest, params: SamplingParams, context, span: Span) -> worker_pb2.PrefillReply:
    """Run the prompt; the reply carries the first token, how much of the prompt was not
    computed here (prefix cache, tier, a peer's pull), and the prompt's logprobs when asked
    (only the engine that computes the prompt can give them). `span`: the RPC's, which the
    engine's request joins."""
    from vllm.inputs import TokensPrompt

    final = None
    try:
        async for out in host.engine.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
            params,
            f"{request.request_id}-prefill",
            priority=request.priority,
            lora_request=host.lora.request_for(request.lora),
            trace_headers=headers_of(span) or None,
        ):
            final = out
    except INVALID_REQUEST_ERRORS as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if final is None or not final.outputs[0].token_ids:
        await context.abort(grpc.StatusCode.INTERNAL, "the engine returned no output for the prefill")
        raise AssertionError  # not reached: abort raises
    return worker_pb2.PrefillReply(
        first_token_id=final.outputs[0].token_ids[0],
        num_cached_tokens=final.num_cached_tokens or 0,
        prompt_logprobs=encode_logprobs(final.prompt_logprobs),
    )
