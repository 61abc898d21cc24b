"""Turning the wire's SamplingOptions into vLLM SamplingParams, with clear errors."""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMClientError

from pdcluster.protos import worker_pb2

# What vLLM raises for a request that is the client's fault (bad params, prompt too long,
# token ids out of vocabulary): answered with INVALID_ARGUMENT.
INVALID_REQUEST_ERRORS = (ValueError, VLLMClientError)


def sampling_params_from(options: worker_pb2.SamplingOptions, kv_transfer_params: dict[str, Any] | None = None, **overrides: Any):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = dict(
        max_tokens=options.max_tokens or 16,
        temperature=options.temperature,
        top_p=options.top_p or 1.0,
        top_k=options.top_k or 0,
        seed=options.seed if options.HasField("seed") else None,
        stop=list(options.stop) or None,
        stop_token_ids=list(options.stop_token_ids) or None,
        ignore_eos=options.ignore_eos,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty or 1.0,
        output_kind=RequestOutputKind.DELTA,
    )
    if options.HasField("min_p"):
        kwargs["min_p"] = options.min_p
    if kv_transfer_params is not None:
        kwargs["extra_args"] = {"kv_transfer_params": kv_transfer_params}
    kwargs.update(overrides)
    return SamplingParams(**kwargs)  # raises INVALID_REQUEST_ERRORS on out-of-range values
