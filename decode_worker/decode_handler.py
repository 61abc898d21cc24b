"""Decode role: generates a request's tokens, loading its prompt KV from the prefill pool.

With a transfer id the engine reserves blocks for the prompt and waits (bounded) for
the KV the prefill worker pushes; without one it computes the prompt itself (short
prompts, or resuming a request elsewhere from prompt + tokens already sent).
"""

from __future__ import annotations

import grpc

from pdcluster.kv_transfer.connector_metadata import CONSUME, CONSUME_FROM, TRANSFER_ID
from pdcluster.protos import worker_pb2
from pdcluster.worker.sampling import INVALID_REQUEST_ERRORS, sampling_params_from


class DecodeHandler:
    def __init__(self, host) -> None:
        self._host = host

    @property
    def queued_prefill_tokens(self) -> int:
        return 0

    async def decode(self, request: worker_pb2.DecodeRequest, context):
        from vllm.inputs import TokensPrompt

        if not request.request_id or not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required")
        kv = None
        if request.HasField("transfer_id"):
            kv = {TRANSFER_ID: request.transfer_id, CONSUME: True, CONSUME_FROM: request.producer_kv_endpoint}
        try:
            params = sampling_params_from(request.sampling, kv)
            stream = self._host.engine.generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)), params, f"{request.request_id}-decode"
            )
            num_output = 0
            async for out in stream:
                completion = out.outputs[0]
                num_output += len(completion.token_ids)
                yield worker_pb2.DecodeChunk(
                    token_ids=completion.token_ids,
                    text=completion.text,
                    finish_reason=completion.finish_reason or "",
                    num_prompt_tokens=len(out.prompt_token_ids or ()),
                    num_output_tokens=num_output,
                    num_cached_tokens=out.num_cached_tokens or 0,
                )
        except INVALID_REQUEST_ERRORS as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
