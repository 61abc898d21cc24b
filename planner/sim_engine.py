"""One simulated engine replica, scheduled in vLLM v1's manner: each step first gives every
running request its next token or prompt chunk, then admits waiting requests while it has
token budget (`max_num_batched_tokens`), sequence slots (`max_num_seqs`) and KV blocks;
prompts are computed in chunks (chunked prefill), and admitted prompts reuse the prefix
blocks still in the replica's cache, then those its host KV tier holds (as our connector's
tier: every full block computed is kept there, LRU; a load or a store is a copy at the
profile's `tier_gbps`, inside the step, as the connector copies before the forward pass).
The step's duration comes from the profile's cost model."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdcluster.common.engine_profile import EngineProfile, prefill_pairs
from pdcluster.planner.workloads import RequestShape
from pdcluster.router.routing_policy import PrefixIndex, leading_blocks


@dataclass(eq=False)
class SimSequence:
    """A request's work on one engine."""

    request: RequestShape
    compute_from: int  # prompt tokens already present (loaded KV) before this engine computes
    stop_after_prompt: bool  # a prefill worker's job: the prompt, then hand the KV over
    on_done: Callable[[SimSequence, float], None]  # called (sequence, now) when the prompt ends (prefill) or the answer does
    on_token: Callable[[SimSequence, float], None] | None = None  # called (sequence, now) per token produced
    hashes_for: Callable[[int], list[int]] | None = None  # block size -> the prompt's block hashes (cached by the caller)
    computed: int = 0  # prompt tokens in KV so far
    generated: int = 0
    blocks: int = 0
    cached_tokens: int = 0
    kv_ready: bool = True  # False: its prompt's KV is still on the way from a prefill worker
    prompt_seconds: float = 0.0  # engine time of the steps that computed its prompt
    copy_seconds: float = 0.0  # host KV tier copies (loads and stores) its first step carries
    pulled: int = 0  # leading prompt tokens a peer sent before this engine computes the rest

    @property
    def prompt_left(self) -> int:
        return self.request.input_tokens - self.computed

    @property
    def context(self) -> int:
        return self.computed + self.generated


@dataclass
class StepWork:
    tokens: int = 0
    pairs: float = 0.0
    context: int = 0
    copy_s: float = 0.0  # host KV tier copies
    chunks: list[tuple[SimSequence, int]] = field(default_factory=list)
    decoding: list[SimSequence] = field(default_factory=list)

    def add_chunk(self, s: SimSequence, budget: int) -> int:
        """Schedule the next piece of `s`'s prompt within `budget`; returns its tokens."""
        n = min(s.prompt_left, budget)
        self.chunks.append((s, n))
        self.tokens += n
        self.pairs += prefill_pairs(n, s.computed)
        return n


class SimEngine:
    def __init__(self, worker_id: str, profile: EngineProfile, tier_blocks: int = 0, index: PrefixIndex | None = None) -> None:
        """`tier_blocks`: its host KV tier's size (0: none); `index`: the router's prefix index,
        told what its cache and tier take in and let go (as KV events tell a router)."""
        self.worker_id = worker_id
        self.profile = profile
        self.total_blocks = profile.total_blocks
        self.free_blocks = self.total_blocks
        self.waiting: deque[SimSequence] = deque()
        self.running: list[SimSequence] = []
        self.awaiting_kv: set[SimSequence] = set()  # blocks allocated, KV not yet landed
        self.cache: OrderedDict[int, None] = OrderedDict()  # prefix-cached block hashes, LRU
        self.tier: OrderedDict[int, None] = OrderedDict()  # the host KV tier's block hashes, LRU
        self.tier_blocks = tier_blocks
        self.index = index
        self.prompt_tokens = {"engine_cache": 0, "tier": 0, "peer": 0, "computed": 0}  # where admitted prompts' tokens came from
        self.busy = False
        self.busy_seconds = 0.0
        self.prompt_seconds = 0.0  # the share of busy time spent on prompt tokens

    @property
    def queued_prefill_tokens(self) -> int:
        return sum(s.prompt_left for s in self.waiting) + sum(s.prompt_left for s in self.running)

    def release(self, sequence: SimSequence) -> None:
        self.free_blocks += sequence.blocks
        sequence.blocks = 0

    def kv_landed(self, sequence: SimSequence) -> None:
        """A remote prompt's KV is here: it runs next if its blocks are allocated already."""
        sequence.kv_ready = True
        if sequence in self.awaiting_kv:
            self.awaiting_kv.remove(sequence)
            self.waiting.appendleft(sequence)

    def _admit(self, sequence: SimSequence) -> bool:
        if sequence.blocks:
            return True
        request = sequence.request
        need = self.profile.blocks_for(request.input_tokens + 1)
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        sequence.blocks = need
        hashes = (sequence.hashes_for or request.block_hashes)(self.profile.block_size)
        if sequence.compute_from:  # its KV comes from a prefill worker: cached here, as computed blocks are
            self._cache(hashes)
            return True
        hit = leading_blocks(hashes, self.cache)
        # The tier offers whole blocks short of the prompt's last token (vLLM samples from it).
        loaded = leading_blocks(hashes[hit : (request.input_tokens - 1) // self.profile.block_size], self.tier) if self.tier_blocks else 0
        self._cache(hashes)
        sequence.copy_seconds = self.profile.tier_copy_seconds(loaded + self._keep_in_tier(hashes))
        from_cache = min(hit * self.profile.block_size, request.input_tokens - 1)
        sequence.cached_tokens = min((hit + loaded) * self.profile.block_size, request.input_tokens - 1)
        pulled = max(0, sequence.pulled - sequence.cached_tokens)
        sequence.computed = max(sequence.computed, sequence.cached_tokens + pulled)
        self.prompt_tokens["engine_cache"] += from_cache
        self.prompt_tokens["tier"] += sequence.cached_tokens - from_cache
        self.prompt_tokens["peer"] += pulled
        self.prompt_tokens["computed"] += request.input_tokens - sequence.cached_tokens - pulled
        return True

    def _cache(self, hashes: list[int]) -> None:
        """The prompt's blocks into the prefix cache (the oldest others out), as its events tell the router."""
        evicted = _touch(self.cache, hashes, self.total_blocks)
        if self.index is not None:
            self.index.record(self.worker_id, hashes, shared=False)
            self.index.remove(self.worker_id, evicted)

    def _keep_in_tier(self, hashes: list[int]) -> int:
        """The prompt's blocks into the host KV tier (the oldest others out); returns how many it copied in."""
        if not self.tier_blocks:
            return 0
        stored = [h for h in hashes if h not in self.tier]
        dropped = _touch(self.tier, hashes, self.tier_blocks)
        if self.index is not None:
            self.index.update_tier(self.worker_id, stored, dropped)
        return len(stored)

    def next_step(self) -> StepWork | None:
        """The next step's work, or None when there is nothing to run."""
        budget = self.profile.max_num_batched_tokens
        work = StepWork()
        for s in self.running:
            if budget == 0:
                break
            if s.prompt_left > 0:
                budget -= work.add_chunk(s, budget)
            else:
                work.decoding.append(s)
                work.tokens += 1
                work.context += s.context
                budget -= 1
        while self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs:
            s = self.waiting[0]
            if not self._admit(s):
                break  # first come, first served: nothing overtakes it
            self.waiting.popleft()
            if not s.kv_ready:  # as vLLM's WAITING_FOR_REMOTE_KVS: holds blocks, does not run
                self.awaiting_kv.add(s)
                continue
            self.running.append(s)
            budget -= work.add_chunk(s, budget)
            work.copy_s += s.copy_seconds
        return work if work.tokens else None

    def step_seconds(self, work: StepWork) -> tuple[float, float]:
        """The step's duration and the part of it spent on prompt tokens."""
        step = self.profile.step
        total = step.seconds(work.tokens, work.pairs, work.context) + work.copy_s
        prompt_tokens = sum(n for _, n in work.chunks)
        prompt = step.per_token_s * prompt_tokens + step.per_prefill_pair_s * work.pairs + work.copy_s
        decode = step.per_token_s * len(work.decoding) + step.per_decode_context_token_s * work.context
        share = prompt / (prompt + decode) if prompt + decode else 0.0
        return total, total * share

    def finish_step(self, work: StepWork, seconds: float, prompt_seconds: float, now: float) -> None:
        self.busy_seconds += seconds
        self.prompt_seconds += prompt_seconds
        for s, n in work.chunks:
            s.computed += n
            s.prompt_seconds += seconds
            if s.prompt_left == 0:
                if s.stop_after_prompt:
                    self.running.remove(s)
                    s.on_done(s, now)
                else:
                    self._produce(s, now)
        for s in work.decoding:
            self._produce(s, now)

    def _produce(self, s: SimSequence, now: float) -> None:
        s.generated += 1
        if s.context % self.profile.block_size == 0 and self.free_blocks > 0:
            self.free_blocks -= 1
            s.blocks += 1
        if s.on_token is not None:
            s.on_token(s, now)
        if s.generated >= s.request.output_tokens:
            self.running.remove(s)
            self.release(s)
            s.on_done(s, now)


def _touch(lru: OrderedDict[int, None], hashes: list[int], capacity: int) -> list[int]:
    """Put `hashes` at the recent end of `lru`; returns what falls out past `capacity`."""
    for h in hashes:
        lru[h] = None
        lru.move_to_end(h)
    return [lru.popitem(last=False)[0] for _ in range(len(lru) - capacity)]
