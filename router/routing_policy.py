"""Which workers serve a request: pure functions over the pool's view, unit-tested alone.

The decode worker is picked first (it must hold the whole sequence), then the prefill
worker by the work it would do: its queued prefill tokens plus the part of this prompt it
does not already hold in its prefix cache (the approach Dynamo's KV router and llm-d take).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass

from pdcluster.common.kv_compatibility import kv_mismatch
from pdcluster.router.config import RouterConfig
from pdcluster.router.placement_prediction import LOCAL, Outlook, PlacementPredictor
from pdcluster.router.worker_pool import WorkerView, queued_prefill_tokens


class PrefixIndex:
    """Per worker, the block hashes of prompts it prefilled recently (LRU, bounded), and those
    its host KV tier holds (from its events)."""

    def __init__(self, capacity_blocks: int = 65536) -> None:
        self._capacity = capacity_blocks
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        self._tier: dict[str, set[int]] = {}
        self.on_record: Callable[[str, list[int]], None] | None = None  # called with (worker_id, hashes) for routing decisions made here

    def record(self, worker_id: str, hashes: list[int], shared: bool = True) -> None:
        """Remember that `worker_id` now holds these blocks; `shared=False` for hints that
        came from other routers (they are not passed on again)."""
        if shared and self.on_record is not None:
            self.on_record(worker_id, hashes)
        blocks = self._blocks.setdefault(worker_id, OrderedDict())
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self._capacity:
            blocks.popitem(last=False)

    def overlap_blocks(self, worker_id: str, hashes: list[int]) -> int:
        """How many leading blocks of the prompt the worker is likely to have cached."""
        return leading_blocks(hashes, self._blocks.get(worker_id, {}))

    def held_blocks(self, worker_id: str, hashes: list[int]) -> int:
        """How many leading blocks of the prompt the worker holds in its engine cache or its
        tier (never fewer than `overlap_blocks`)."""
        return leading_blocks(hashes, self._blocks.get(worker_id, {}), self._tier.get(worker_id, set()))

    def remove(self, worker_id: str, hashes) -> None:
        """The worker evicted these blocks (its engine said so)."""
        blocks: dict[int, None] = self._blocks.get(worker_id, {})
        for h in hashes:
            blocks.pop(h, None)

    def update_tier(self, worker_id: str, stored, removed) -> None:
        """What the worker's host KV tier took in and let go (its events; bounded by the tier)."""
        tier = self._tier.setdefault(worker_id, set())
        tier.update(stored)
        tier.difference_update(removed)

    def sizes(self) -> dict[str, int]:
        """Blocks remembered per worker."""
        return {worker_id: len(blocks) for worker_id, blocks in self._blocks.items()}

    def forget(self, worker_id: str) -> None:
        self._blocks.pop(worker_id, None)
        self._tier.pop(worker_id, None)


def leading_blocks(hashes: list[int], *held: Container[int]) -> int:
    """How many of `hashes`, from the first, one of `held` contains, without a gap."""
    count = 0
    for h in hashes:
        if not any(h in blocks for blocks in held):
            break
        count += 1
    return count


# What a worker without a request's LoRA adapter loaded costs in the choice: loading it takes
# time and an adapter slot, worth this many requests queued on a decode worker, or this many
# prompt tokens queued on a prefill worker. A soft preference: traffic for one adapter still
# spreads once the workers holding it are that much busier than the others.
ADAPTER_LOAD_COST_REQUESTS = 4
ADAPTER_LOAD_COST_TOKENS = 1024
# A block copied back from a worker's host KV tier, as a fraction of computing it: far less
# (a copy, ~0.1% on this CPU machine; PCIe against the model's FLOPs on a GPU), but not free,
# so an engine-cache hit wins a tie with a tier hit.
TIER_LOAD_COST = 0.1


def _lacks_adapter(worker: WorkerView, lora_name: str | None) -> bool:
    return bool(lora_name) and lora_name not in worker.stats.lora_adapters


def _load(worker: WorkerView) -> int:
    """Requests on the worker: its own count, or ours where the last poll lags behind."""
    stats = worker.stats
    return max(stats.running + stats.queued, worker.load.inflight)


def _fits(w: WorkerView, total_tokens: int) -> bool:
    blocks_needed = -(-total_tokens // max(w.stats.block_size, 1))
    return w.stats.free_kv_blocks >= blocks_needed or w.stats.total_kv_blocks == 0


def pick_decode_worker(
    workers: list[WorkerView], total_tokens: int, lora_name: str | None = None, session_worker: str = ""
) -> WorkerView | None:
    """A conversation's next turn stays on `session_worker`, its last one's, until that worker
    is saturated: it lacks KV room for the sequence or has requests waiting. Otherwise prefer
    workers with room for the whole sequence, then the least loaded (counting a LoRA adapter to
    load as requests), then the most free KV, then the one picked least recently."""
    if not workers:
        return None
    for w in workers:
        if w.worker_id == session_worker and _fits(w, total_tokens) and not w.stats.queued:
            return w

    def key(w: WorkerView):
        load = _load(w) + ADAPTER_LOAD_COST_REQUESTS * _lacks_adapter(w, lora_name)
        return (not _fits(w, total_tokens), load, -int(w.stats.free_kv_blocks), w.load.last_picked)

    return min(workers, key=key)


def pick_prefill_worker(
    workers: list[WorkerView],
    prompt_len: int,
    index: PrefixIndex,
    hashes_for,
    lora_name: str | None = None,
    *,
    recompute_weight: float,
) -> tuple[WorkerView | None, int]:
    """The worker with the least prefill work: the tokens queued there, plus `recompute_weight`
    times what this prompt would cost there: its tokens less the cached prefix (a prefix in its
    host KV tier counting as TIER_LOAD_COST of computing it, a LoRA adapter to load as tokens).
    Then the least loaded, then the one picked least recently. Returns it and the prefix tokens
    it likely holds, in its engine cache or tier. `hashes_for(block_size)` gives the prompt's
    block hashes for a worker's block size."""
    best, best_key, best_overlap = None, None, 0
    for w in workers:
        block_size = max(w.stats.block_size, 1)
        hashes = hashes_for(block_size)
        cached = index.overlap_blocks(w.worker_id, hashes) * block_size
        overlap = index.held_blocks(w.worker_id, hashes) * block_size
        loaded = TIER_LOAD_COST * (overlap - cached)  # what the tier's blocks cost to copy back
        own = prompt_len - overlap + loaded + ADAPTER_LOAD_COST_TOKENS * _lacks_adapter(w, lora_name)
        work = queued_prefill_tokens(w) + recompute_weight * own
        key = (work, _load(w), w.load.last_picked)
        if best_key is None or key < best_key:
            best, best_key, best_overlap = w, key, overlap
    return best, best_overlap


def should_bypass_prefill(prompt_len: int, threshold_tokens: int) -> bool:
    """Tiny prompts cost the decode worker less than a transfer would."""
    return prompt_len < threshold_tokens


def prefill_backlog_too_deep(prefill: WorkerView, limit_tokens: int) -> bool:
    """With a limit set: the best prefill worker's backlog would delay this prompt more than
    computing it on the decode worker does (a per-request choice, as llm-d and Dynamo make)."""
    return limit_tokens > 0 and queued_prefill_tokens(prefill) > limit_tokens


@dataclass(frozen=True)
class PeerPull:
    """A prefix the chosen prefill worker lacks and `peer` holds: the peer sends its KV, the
    prefill worker computes only the rest."""

    peer: WorkerView
    tokens: int  # leading prompt tokens to pull: whole blocks, fewer than the prompt's
    held_tokens: int  # of them, those the prefill worker holds (not sent)


def plan_peer_pull(
    prefill: WorkerView,
    overlap: int,
    peers: list[WorkerView],
    prompt_len: int,
    index: PrefixIndex,
    hashes_for: Callable[[int], list[int]],
    config: RouterConfig,
    predictor: PlacementPredictor | None = None,
) -> PeerPull | None:
    """The peer whose prefix of the prompt, beyond the `overlap` the prefill worker holds, saves
    the most: at least `peer_pull_min_tokens` tokens, and then, with a profile, the predicted
    time saved (computing them, against the peer's queue, its last block and the transfer);
    without one, those tokens less the peer's queued prompt tokens. None where none saves."""
    if config.peer_pull_min_tokens <= 0:
        return None
    block = max(prefill.stats.block_size, 1)
    limit = (prompt_len - 1) // block * block  # the prompt's last token is computed where it is sampled
    best, best_saving = None, 0.0
    for peer in peers:
        if peer.worker_id == prefill.worker_id or peer.stats.block_size != prefill.stats.block_size:
            continue
        held = min(index.held_blocks(peer.worker_id, hashes_for(block)) * block, limit)
        if held - overlap < config.peer_pull_min_tokens:
            continue
        if predictor is not None:
            saving = predictor.pull_saving_s(peer, prompt_len, overlap, held)
        else:
            saving = held - overlap - queued_prefill_tokens(peer) - block  # the peer computes its last block
        if saving > best_saving:
            best, best_saving = PeerPull(peer, held, overlap), saving
    return best


@dataclass
class PrefillPlacement:
    """Where a prompt is computed: on `worker` (holding `overlap_tokens` of it already), or,
    with `worker` None, on its decode worker for the reason `bypass`. With a profile, the
    outlook of the choice made and of the one passed over."""

    worker: WorkerView | None
    overlap_tokens: int = 0
    decode_held_tokens: int = 0  # of the prompt, on its decode worker (the index's view): that KV need not move
    bypass: str = ""  # short_prompt | decode_holds_prefix | no_prefill_worker | kv_incompatible | prefill_backlog | predicted
    pull: PeerPull | None = None  # a prefix the prefill worker takes from a peer instead of computing it
    chosen: Outlook | None = None
    passed_over: Outlook | None = None
    # Prefill workers whose KV the decode worker could not take, each with the field that differs.
    incompatible: tuple[tuple[WorkerView, str], ...] = ()

    @property
    def basis(self) -> str:
        """What decided: a prediction, a rule (a bypass reason), or, remote, the default."""
        if self.chosen is not None:
            return "prediction"
        return self.bypass or "default"


def place_prefill(
    candidates: list[WorkerView],
    decode: WorkerView,
    prompt_len: int,
    index: PrefixIndex,
    hashes_for: Callable[[int], list[int]],
    config: RouterConfig,
    predictor: PlacementPredictor | None = None,
    lora_name: str | None = None,
    peer_pull: bool = True,
) -> PrefillPlacement:
    """The router's whole prefill choice for one prompt, its decode worker already picked.
    Rules first: a short prompt, a prompt whose decode worker holds all of it but a short rest
    (a conversation's next turn, where its earlier turns ran: computed there, nothing moves),
    or with `local_prefill_above_queued_tokens` set, a deep prefill backlog, stays on the
    decode worker; then, with a profile, the predicted outlooks decide (the decode worker's
    prefix counted). A prefill worker lacking a prefix a peer (another prefill worker, or the
    decode worker) holds pulls it where `plan_peer_pull` says it pays (not with `peer_pull`
    False: prompt logprobs are computed from the whole prompt). A chosen prefill worker is
    recorded in `index` as now holding the prompt's blocks: with `kv-events` routing the
    worker's own events then confirm or correct that."""
    if should_bypass_prefill(prompt_len, config.bypass_prefill_below_tokens):
        return PrefillPlacement(None, bypass="short_prompt")
    decode_held = 0
    if candidates and config.prefill_routing != "round-robin":  # with no prefill worker, every prompt is local anyway
        block_size = max(decode.stats.block_size, 1) if decode.stats else 1
        decode_held = min(index.held_blocks(decode.worker_id, hashes_for(block_size)) * block_size, prompt_len - 1)
        if decode_held and should_bypass_prefill(prompt_len - decode_held, config.bypass_prefill_below_tokens):
            return PrefillPlacement(None, bypass="decode_holds_prefix")
    theirs = decode.stats.kv_compatibility if decode.stats else {}
    mismatches = [(w, kv_mismatch(w.stats.kv_compatibility if w.stats else {}, theirs)) for w in candidates]
    incompatible = tuple((w, field) for w, field in mismatches if field is not None)
    candidates = [w for w, field in mismatches if field is None]
    if config.prefill_routing == "round-robin":
        prefill, overlap = min(candidates, key=lambda w: w.load.last_picked, default=None), 0
    else:
        prefill, overlap = pick_prefill_worker(
            candidates, prompt_len, index, hashes_for, lora_name, recompute_weight=config.recompute_weight
        )
    if prefill is None:
        return PrefillPlacement(None, bypass="kv_incompatible" if incompatible else "no_prefill_worker", incompatible=incompatible)
    if prefill_backlog_too_deep(prefill, config.local_prefill_above_queued_tokens):
        return PrefillPlacement(None, bypass="prefill_backlog", incompatible=incompatible)
    chosen = passed_over = None
    if predictor is not None and config.local_prefill_above_queued_tokens <= 0:
        chosen, passed_over = predictor.choose(prefill, decode, prompt_len, overlap, decode_held)
        if chosen.choice == LOCAL:
            return PrefillPlacement(None, bypass="predicted", chosen=chosen, passed_over=passed_over, incompatible=incompatible)
    pull = None
    if config.prefill_routing != "round-robin":
        if peer_pull:
            pull = plan_peer_pull(prefill, overlap, [*candidates, decode], prompt_len, index, hashes_for, config, predictor)
        index.record(prefill.worker_id, hashes_for(max(prefill.stats.block_size, 1)))
    return PrefillPlacement(prefill, overlap, decode_held, pull=pull, chosen=chosen, passed_over=passed_over, incompatible=incompatible)
