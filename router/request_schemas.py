"""Validated request shapes: the OpenAI completions/chat bodies and the sampling knobs
they share with the gRPC `Inference` API. Out-of-range values are refused here, before
any worker sees them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pdcluster.protos import worker_pb2

MAX_STOP_SEQUENCES = 16
INT64 = 2**63 - 1

# OpenAI parameters the cluster does not implement, with the values that mean "off".
_UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "logit_bias": (None, {}),
}


class SamplingFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, off in _UNSUPPORTED.items():
                if name in data and data[name] not in off:
                    raise ValueError(f"`{name}` is not supported by this server")
        return data

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids_in_range(cls, ids):
        if ids and any(not 0 <= t < 2**32 for t in ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return ids

    def sampling_options(self, max_tokens: int) -> worker_pb2.SamplingOptions:
        options = worker_pb2.SamplingOptions(
            max_tokens=max_tokens,
            # The wire's 0 temperature is greedy, so OpenAI's default is spelled out here; its
            # other zeros mean "unset", and the worker applies vLLM's defaults to them.
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 0.0,
            top_k=self.top_k,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty or 0.0,
        )
        if self.seed is not None:
            options.seed = self.seed
        if self.min_p is not None:
            options.min_p = self.min_p
        return options


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class OpenAIRequest(SamplingFields):
    model: str | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    request_id: str | None = Field(None, max_length=128)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string, one token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart]

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
