"""What travels between the router and the workers about sampling: vLLM's own SamplingParams
(msgspec, as vLLM sends them to its engine core), and logprobs in a compact msgpack form.

Both sides run the same pinned vLLM, so every option the OpenAI layer sets reaches the engine
as it was set, with nothing re-declared here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.logprobs import Logprob


def encode_sampling_params(params: SamplingParams) -> bytes:
    return msgspec.msgpack.encode(params)


def decode_sampling_params(data: bytes) -> SamplingParams:
    from vllm import SamplingParams

    return msgspec.msgpack.decode(data, type=SamplingParams)


def encode_logprobs(positions) -> bytes:
    """vLLM's sample or prompt logprobs (a list of dicts, or FlatLogprobs), one list of
    (token_id, logprob, rank, decoded_token) per position, None where vLLM has none (the first
    prompt token); empty bytes for None."""
    if positions is None:
        return b""
    return msgspec.msgpack.encode(
        [None if p is None else [(token, lp.logprob, lp.rank, lp.decoded_token) for token, lp in p.items()] for p in positions]
    )


def decode_logprobs(data: bytes) -> list[dict[int, Logprob] | None] | None:
    if not data:
        return None
    from vllm.logprobs import Logprob

    return [
        None if p is None else {token: Logprob(logprob, rank, decoded) for token, logprob, rank, decoded in p}
        for p in msgspec.msgpack.decode(data)
    ]
