"""What one engine replica costs in time and money, as the simulator and the planner read it.

One engine step (vLLM's continuous batching: prompt chunks and one token per decoding
request in the same forward pass) takes

    base + per_token * tokens + per_prefill_pair * prefill_pairs + per_decode_context_token * context

- tokens: every token the step computes (prompt-chunk tokens, plus one per decoding request);
- prefill_pairs: for each prompt chunk, its tokens times the tokens they attend to (the
  prefix already cached or computed, plus half the chunk: attention is causal);
- context: the summed context of the decoding requests (the KV each step reads).

`pdcluster profile` fits the four coefficients to measurements on a real engine; the
reference profiles derive them from a roofline. Either way the raw inputs and the source of
every number travel in the file.

Around the engines, the serving path (the router, the Decode and Prefill RPCs, the KV
handoff, streaming) adds its own time to each request and token (`ServingPath`), which
`pdcluster profile` measures on a 1P+1D of the engine and the simulator adds.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class StepCost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_s: float = Field(ge=0)
    per_token_s: float = Field(ge=0)
    per_prefill_pair_s: float = Field(ge=0)
    per_decode_context_token_s: float = Field(ge=0)

    def seconds(self, tokens: int, prefill_pairs: float, decode_context: int) -> float:
        return (
            self.base_s
            + self.per_token_s * tokens
            + self.per_prefill_pair_s * prefill_pairs
            + self.per_decode_context_token_s * decode_context
        )


class ServingPath(BaseModel):
    """What pdcluster's serving path adds to the engines' own time (what the step model
    predicts for a request alone on an idle 1P+1D), in seconds."""

    model_config = ConfigDict(extra="forbid")

    request_s: float = Field(0.0, ge=0)  # to the TTFT of a prompt computed on its decode worker
    remote_request_s: float = Field(0.0, ge=0)  # to the TTFT of a prompt prefilled remotely
    token_s: float = Field(0.0, ge=0)  # to each gap between later tokens

    def first_token_s(self, remote: bool) -> float:
        return self.remote_request_s if remote else self.request_s


def prefill_pairs(chunk: int, before: int) -> float:
    """Attention pairs of a prompt chunk of `chunk` tokens after `before` tokens of context."""
    return chunk * (before + chunk / 2)


class EngineProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    estimate: bool  # True: derived from datasheets and a roofline, not measured
    hardware: str
    model: str
    tensor_parallel_size: int = Field(1, ge=1)
    gpus_per_replica: int = Field(0, ge=0)  # 0: a CPU replica
    cpu_cores: int = Field(0, ge=0)  # the cores a CPU replica computes on (0 on GPUs)
    block_size: int = Field(ge=1)
    max_num_seqs: int = Field(ge=1)
    max_num_batched_tokens: int = Field(ge=1)
    max_model_len: int = Field(ge=1)
    kv_capacity_tokens: int = Field(ge=1)  # KV cache of one replica, in tokens
    kv_bytes_per_token: int = Field(ge=1)
    step: StepCost
    transfer_gbps: float = Field(gt=0)  # KV between a prefill and a decode replica
    transfer_latency_s: float = Field(0.0, ge=0)  # per transfer, on top of bytes / rate
    # The host KV tier's copy rate (vLLM's --kv-offloading-size): a block stored into it or
    # loaded back, checksum included. 0: not measured (a profile from before tiers).
    tier_gbps: float = Field(0.0, ge=0)
    serving_path: ServingPath = Field(default_factory=ServingPath)  # zero: not measured (reference profiles)
    cost_per_hour: float = Field(0.0, ge=0)  # USD for one replica
    sources: dict[str, str] = Field(default_factory=dict)  # field -> where its number comes from
    measurements: dict = Field(default_factory=dict)  # the raw samples a measured profile was fitted to

    @property
    def replica_units(self) -> int:
        """What one replica takes of a plan's budget: its GPUs, or its cores on a CPU."""
        return self.gpus_per_replica or max(1, self.cpu_cores)

    @property
    def replica_size(self) -> int:
        """A replica's size as plans name it: its TP size on GPUs, its cores on a CPU."""
        return self.tensor_parallel_size if self.gpus_per_replica else max(1, self.cpu_cores)

    @property
    def total_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def holds(self, prompt_tokens: int, output_tokens: int) -> bool:
        """Whether one replica serves the request at all: vLLM refuses a prompt and answer
        longer than max_model_len, and cannot admit a prompt (and its first token) whose blocks
        exceed its cache."""
        return prompt_tokens + output_tokens <= self.max_model_len and self.blocks_for(prompt_tokens + 1) <= self.total_blocks

    def prefill_steps(self, tokens: int, cached: int = 0, decoding: int = 0, decode_context: int = 0) -> list[float]:
        """The steps that compute a prompt in chunks, as vLLM's chunked prefill runs it: each
        step also gives `decoding` requests (holding `decode_context` tokens in all) a token."""
        budget = max(1, self.max_num_batched_tokens - decoding)
        steps, done = [], cached
        while done < tokens:
            chunk = min(budget, tokens - done)
            steps.append(self.step.seconds(chunk + decoding, prefill_pairs(chunk, done), decode_context))
            done += chunk
        return steps

    def prefill_seconds(self, tokens: int, cached: int = 0) -> float:
        """One prompt alone on an idle engine."""
        return sum(self.prefill_steps(tokens, cached))

    def queued_prompt_seconds(self, tokens: int) -> float:
        """Prompt tokens of unknown prompts waiting on an engine: their chunks' fixed cost and
        per-token cost, without the attention between them (a lower bound)."""
        return -(-tokens // self.max_num_batched_tokens) * self.step.base_s + tokens * self.step.per_token_s

    def decode_step_seconds(self, decoding: int, decode_context: int) -> float:
        """A step that only gives `decoding` requests their next token."""
        return self.step.seconds(decoding, 0, decode_context) if decoding else 0.0

    def transfer_seconds(self, tokens: int) -> float:
        return self.transfer_latency_s + tokens * self.kv_bytes_per_token / (self.transfer_gbps * 1e9)

    def pull_seconds(self, tokens: int, moved: int) -> float:
        """A prefix of `tokens` pulled from a peer that holds it: its request there (which
        computes the prefix's last block, as vLLM always does), and `moved` tokens' KV sent."""
        last_block = self.prefill_seconds(tokens, cached=max(0, tokens - self.block_size))
        return self.serving_path.remote_request_s + last_block + self.transfer_seconds(moved)

    def tier_blocks(self, gib: float) -> int:
        """Engine blocks (every layer) a host KV tier of `gib` GiB holds."""
        return int(gib * (1 << 30)) // (self.kv_bytes_per_token * self.block_size)

    def tier_copy_seconds(self, blocks: int) -> float:
        """Blocks stored into the host KV tier or loaded back from it."""
        return blocks * self.block_size * self.kv_bytes_per_token / (self.tier_gbps * 1e9) if blocks else 0.0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=1) + "\n")


def load_profile(path: str | Path) -> EngineProfile:
    return EngineProfile.model_validate_json(Path(path).read_text())
