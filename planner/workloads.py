"""The requests a benchmark sends and the simulator replays: seeded synthetic mixes with
Poisson arrivals, or a real trace (Azure 2023, Mooncake) scaled to the machine.

A request is a `RequestShape`: when it arrives, how long its prompt and answer are, and the
shared prefix blocks its prompt starts with. `prompt_tokens` turns one into token ids for a
real server, so equal prefix blocks become equal token prefixes; `block_hashes` gives the
simulator the same identity without materialising tokens.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from datetime import datetime

TRACE_FORMATS = ("azure", "mooncake")
MOONCAKE_BLOCK_TOKENS = 512  # what one Mooncake hash id covers


@dataclass(frozen=True)
class RequestShape:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    # Ids of the prompt's blocks of `block_tokens` each: equal ids at equal positions are equal
    # prefixes (Mooncake's hash_ids). Empty: the prompt shares nothing.
    prefix_blocks: tuple[int, ...] = ()
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    seed: int = 0  # the rest of the prompt's tokens

    def block_hashes(self, block_size: int) -> list[int]:
        """One id per full block of `block_size` tokens, equal exactly where the prompts' token
        prefixes up to that block's end are equal (as the router's chained hashes are)."""
        ends = range(block_size, self.input_tokens + 1, block_size)
        shared = len(self.prefix_blocks) * self.block_tokens
        blocks, per = self.prefix_blocks, self.block_tokens
        unique = -((self.seed + 1) << 32)  # negative: never a prefix block's id
        return [(blocks[(end - 1) // per] << 32) + end if end <= shared else unique - end for end in ends]

    def prompt_tokens(self, vocab: int) -> list[int]:
        """Token ids: each prefix block's from its id, the rest from the request's seed."""
        low, high = min(100, vocab // 4), vocab - 1  # clear of the special tokens at the start
        tokens: list[int] = []
        for block in self.prefix_blocks:
            if len(tokens) >= self.input_tokens:
                break
            rng = random.Random(f"block-{block}")
            tokens += [rng.randint(low, high) for _ in range(self.block_tokens)]
        rng = random.Random(f"request-{self.seed}")
        tokens += [rng.randint(low, high) for _ in range(max(0, self.input_tokens - len(tokens)))]
        return tokens[: self.input_tokens]


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start, open loop, the same for the same seed."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


@dataclass
class Workload:
    prompt_tokens: int = 512
    output_tokens: int = 64
    distribution: str = "uniform"  # fixed | uniform (±50%) | exponential (mean as given)
    prefix_share: float = 0.0  # fraction of each prompt taken from a shared prefix
    prefix_groups: int = 4  # how many distinct shared prefixes
    seed: int = 0

    def _length(self, rng: random.Random, mean: int) -> int:
        if self.distribution == "fixed":
            return mean
        if self.distribution == "exponential":
            return max(1, int(rng.expovariate(1.0 / mean)))
        return max(1, int(rng.uniform(0.5 * mean, 1.5 * mean)))

    def shapes(self, count: int, rate: float) -> list[RequestShape]:
        """`count` requests arriving as a Poisson process at `rate`, the same for the same seed."""
        rng = random.Random(self.seed)
        shared = int(self.prompt_tokens * self.prefix_share)
        arrivals = poisson_arrivals(count, rate, self.seed)
        out = []
        for i, arrival in enumerate(arrivals):
            n = self._length(rng, self.prompt_tokens)
            group = rng.randrange(self.prefix_groups)
            out.append(
                RequestShape(
                    arrival,
                    n,
                    self._length(rng, self.output_tokens),
                    (group,) if shared else (),
                    block_tokens=max(1, shared),
                    seed=self.seed * 1_000_003 + i,
                )
            )
        return out


@dataclass(frozen=True)
class AgenticSessions:
    """Multi-turn agent sessions, scaled to a small machine from the field figures issue 25
    plans against (long contexts that grow a little each turn; 96% of turns reuse >= 90% of
    their input): each turn's prompt is the session's previous prompt and `growth_tokens`
    more (the answer, a tool's output, the next message), `think_s` after the previous turn
    arrived. Sessions start `session_gap_s` apart, so their turns interleave."""

    sessions: int = 8
    turns: int = 6
    first_prompt_tokens: int = 1536
    growth_tokens: int = 128
    output_tokens: int = 32
    think_s: float = 4.0
    session_gap_s: float = 0.5
    block_tokens: int = 128  # one prefix id per this many tokens: a CPU engine's KV block
    seed: int = 0

    def shapes(self) -> list[RequestShape]:
        out = []
        for s in range(self.sessions):
            ids = ((self.seed * 10_007 + s + 1) << 16) + 1  # this session's blocks, in order
            for t in range(self.turns):
                tokens = self.first_prompt_tokens + t * self.growth_tokens
                blocks = tuple(range(ids, ids + -(-tokens // self.block_tokens)))
                arrival = s * self.session_gap_s + t * self.think_s
                out.append(RequestShape(arrival, tokens, self.output_tokens, blocks, self.block_tokens, seed=ids + t))
        return sorted(out, key=lambda r: r.arrival_s)


# `pdcluster bench compare`'s mixes.
COMPARE_WORKLOADS = {
    # Long prompts, short answers: prefill steps land between a co-located engine's decode steps.
    "prefill-heavy": Workload(prompt_tokens=1024, output_tokens=32, distribution="uniform", seed=1),
    "decode-heavy": Workload(prompt_tokens=128, output_tokens=256, distribution="uniform", seed=2),
    # Where peers lose most to co-located serving (up to 3.4x).
    "balanced": Workload(prompt_tokens=512, output_tokens=256, distribution="uniform", seed=3),
}
COMPARE_RATES = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)  # req/s, the sweep of `bench compare`


@dataclass
class TraceScaling:
    """How a production trace is fitted to a machine: lengths times `length_scale` (capped so
    prompt and answer fit `max_model_len`), timestamps times `time_scale` (below 1: faster),
    `max_requests` (0: all) from request `first_request` on."""

    length_scale: float = 1.0
    time_scale: float = 1.0
    max_requests: int = 0
    max_model_len: int = 0
    first_request: int = 0
    notes: list[str] = field(default_factory=list)


def load_trace(path: str, fmt: str, scaling: TraceScaling = TraceScaling()) -> list[RequestShape]:
    """A trace's requests in arrival order, scaled; arrivals count from the first request."""
    if fmt not in TRACE_FORMATS:
        raise ValueError(f"--trace-format must be one of {', '.join(TRACE_FORMATS)}, not {fmt!r}")
    rows = _azure_rows(path) if fmt == "azure" else _mooncake_rows(path)
    rows = rows[scaling.first_request :]
    if scaling.max_requests:
        rows = rows[: scaling.max_requests]
    if not rows:
        raise ValueError(f"{path}: no requests")
    start = rows[0][0]
    block_tokens = max(1, round(MOONCAKE_BLOCK_TOKENS * scaling.length_scale))
    out = []
    for i, (t, prompt, answer, blocks) in enumerate(rows):
        prompt = max(1, round(prompt * scaling.length_scale))
        answer = max(1, round(answer * scaling.length_scale))
        if scaling.max_model_len:
            answer = min(answer, scaling.max_model_len // 2)
            prompt = min(prompt, scaling.max_model_len - answer - 1)
        out.append(RequestShape((t - start) * scaling.time_scale, prompt, answer, blocks, block_tokens, seed=i))
    return out


def _azure_rows(path: str) -> list[tuple[float, int, int, tuple]]:
    with open(path) as f:
        return [
            (datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp(), int(r["ContextTokens"]), int(r["GeneratedTokens"]), ())
            for r in csv.DictReader(f)
        ]


def _mooncake_rows(path: str) -> list[tuple[float, int, int, tuple]]:
    with open(path) as f:
        rows = (json.loads(line) for line in f if line.strip())
        return [(r["timestamp"] / 1e3, r["input_length"], r["output_length"], tuple(r.get("hash_ids", ()))) for r in rows]
