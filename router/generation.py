"""One sample's request as the router runs it, and what comes back: deltas and usage."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.context import Context
from vllm import SamplingParams
from vllm.lora.request import LoRARequest


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # n == 1; max_tokens is always set
    reasoning_ended: bool | None = None  # vLLM's OpenAI layer's word on the reasoning parser's state
    reasoning_parser_kwargs: dict | None = None
    priority: int = 0  # vLLM's: lower runs first, in the router's queue and on the workers
    lora: LoRARequest | None = None  # vLLM's, as its OpenAI layer resolved the model name
    trace: Context | None = None  # the caller's trace (W3C headers it sent); None: the current one
    session_id: str | None = None  # vLLM's (X-Session-ID, `session_id`, vllm_xargs): turns stay on one decode worker
    # A Responses API turn: the id of its response (its conversation's key from now on) and of
    # the response it continues (`previous_response_id`), for the same affinity as a session id.
    response_id: str | None = None
    continues: str | None = None
    tenant: str = ""  # whose request: admission shares slots fairly between tenants of a class
    tenant_class: int = 0  # the tenant's admission class (lower first)


@dataclass
class TokenDelta:
    token_ids: list[int]
    text: str
    finish_reason: str = ""
    stop_reason: int | str | None = None
    logprobs: list | None = None  # vLLM's, one position per token, when asked for
    cumulative_logprob: float | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list | None = None  # vLLM's, when asked for; known before the first delta
