"""The request's vLLM SamplingParams, as the router sent them, made ready for this engine:
one sample, streamed in deltas, with our connector's kv_transfer_params."""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMClientError

from pdcluster.common.sample_wire import decode_sampling_params

# What vLLM raises for a request that is the client's fault (bad params, prompt too long,
# token ids out of vocabulary): answered with INVALID_ARGUMENT.
INVALID_REQUEST_ERRORS = (ValueError, VLLMClientError)


def request_sampling_params(data: bytes, kv_transfer_params: dict[str, Any] | None = None, **overrides: Any):
    from vllm.sampling_params import RequestOutputKind

    params = decode_sampling_params(data)  # a malformed message raises a ValueError subclass
    params.n = 1  # the router fans n out over workers itself
    params.output_kind = RequestOutputKind.DELTA
    if kv_transfer_params is not None:
        params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": kv_transfer_params}
    for name, value in overrides.items():
        setattr(params, name, value)
    return params
