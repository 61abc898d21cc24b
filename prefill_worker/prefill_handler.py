"""Prefill role: computes a prompt once and streams its KV to the chosen decode worker.

The engine runs the prompt with max_tokens=1; our connector pushes each layer's KV to
the target's KV endpoint while the next layer computes. The reply carries the first
token and how much of the prompt the prefix cache served.
"""

from __future__ import annotations

import grpc

from pdcluster.kv_transfer.connector_metadata import PRODUCE_TO, TRANSFER_ID
from pdcluster.protos import worker_pb2
from pdcluster.worker.sampling import INVALID_REQUEST_ERRORS, sampling_params_from


class PrefillHandler:
    def __init__(self, host) -> None:
        self._host = host
        self._queued_tokens = 0

    @property
    def queued_prefill_tokens(self) -> int:
        return self._queued_tokens

    async def prefill(self, request: worker_pb2.PrefillRequest, context) -> worker_pb2.PrefillReply:
        from vllm.inputs import TokensPrompt

        target = request.target
        if not request.request_id or not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required")
        if not target.transfer_id or not target.consumer_endpoint:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target.transfer_id and target.consumer_endpoint are required")
        kv = {TRANSFER_ID: target.transfer_id, PRODUCE_TO: target.consumer_endpoint}
        num_tokens = len(request.prompt_token_ids)
        self._queued_tokens += num_tokens
        final = None
        try:
            params = sampling_params_from(request.sampling, kv, max_tokens=1, stop=None, min_tokens=0)
            async for out in self._host.engine.generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)), params, f"{request.request_id}-prefill"
            ):
                final = out
        except INVALID_REQUEST_ERRORS as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self._queued_tokens -= num_tokens
        if final is None or not final.outputs[0].token_ids:
            await context.abort(grpc.StatusCode.INTERNAL, "the engine returned no output for the prefill")
        return worker_pb2.PrefillReply(first_token_id=final.outputs[0].token_ids[0], num_cached_tokens=final.num_cached_tokens or 0)
