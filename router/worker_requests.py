"""The Decode and Prefill messages of one attempt at a request (pure: no I/O).

An attempt after a lost decode worker continues the request: its prompt is the original
prompt plus the tokens already sent, and its params ask only for what is left.
"""

from __future__ import annotations

import msgspec
from vllm import SamplingParams

from pdcluster.common.sample_wire import encode_sampling_params
from pdcluster.protos import worker_pb2
from pdcluster.router.errors import NoCapacity
from pdcluster.router.generation import GenerationRequest
from pdcluster.router.routing_policy import PrefillPlacement
from pdcluster.router.worker_pool import WorkerView


def attempt_params(params: SamplingParams, num_sent: int) -> SamplingParams:
    """The request's params for an attempt that continues after `num_sent` tokens."""
    if not num_sent:
        return params
    if params.structured_outputs is not None:
        # vLLM cannot start a grammar part-way through an output: fail rather than break it.
        raise NoCapacity(
            f"the decode worker was lost after {num_sent} tokens, and a structured output cannot resume on another; retry the request"
        )
    resumed = params.clone()
    resumed.max_tokens = params.max_tokens - num_sent
    resumed.min_tokens = max(0, params.min_tokens - num_sent)
    resumed.prompt_logprobs = None  # the client has them
    return resumed


def decode_request(
    request: GenerationRequest, attempt_id: str, prompt: list[int], params: SamplingParams, prefill: WorkerView | None
) -> worker_pb2.DecodeRequest:
    """With a prefill worker, decode waits for the KV of transfer `attempt_id`; without one,
    it computes the prompt (and its logprobs) itself."""
    if prefill is not None and params.prompt_logprobs is not None:
        params = params.clone()  # the prefill worker computes the prompt, and its logprobs
        params.prompt_logprobs = None
    return worker_pb2.DecodeRequest(
        request_id=attempt_id,
        prompt_token_ids=prompt,
        sampling_params=encode_sampling_params(params),
        transfer_id=attempt_id if prefill else None,
        producer_kv_endpoint=prefill.stats.kv_endpoint if prefill else "",
        reasoning_ended=request.reasoning_ended,
        reasoning_parser_kwargs=msgspec.msgpack.encode(request.reasoning_parser_kwargs) if request.reasoning_parser_kwargs else b"",
        priority=request.priority,
        lora=lora_adapter(request),
    )


def prefill_request(
    request: GenerationRequest, attempt_id: str, prompt: list[int], params: SamplingParams, decode: WorkerView, placement: PrefillPlacement
) -> worker_pb2.PrefillRequest:
    """The prompt's KV goes to `decode`'s KV endpoint under transfer `attempt_id`, less the
    tokens the placement believes are there already; a prefix a peer holds is pulled from it."""
    pull = placement.pull
    return worker_pb2.PrefillRequest(
        request_id=attempt_id,
        prompt_token_ids=prompt,
        sampling_params=encode_sampling_params(params),
        target=worker_pb2.KVTransferTarget(
            transfer_id=attempt_id, consumer_endpoint=decode.stats.kv_endpoint, consumer_prefix_tokens=placement.decode_held_tokens
        ),
        priority=request.priority,
        lora=lora_adapter(request),
        pull=worker_pb2.PeerPull(
            worker=pull.peer.address, kv_endpoint=pull.peer.stats.kv_endpoint, tokens=pull.tokens, held_tokens=pull.held_tokens
        )
        if pull
        else None,
    )


def lora_adapter(request: GenerationRequest) -> worker_pb2.LoRAAdapter | None:
    """The request's adapter, for both its workers: the KV depends on it."""
    return worker_pb2.LoRAAdapter(name=request.lora.lora_name, path=request.lora.lora_path) if request.lora else None
