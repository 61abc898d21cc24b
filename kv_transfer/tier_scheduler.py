"""The scheduler side of the host KV tier: which prompt blocks a request can load from the tier
instead of computing, and which computed blocks to copy into it. Every full block an engine
computes is kept there (blocks already held only count as used), so a block the engine evicts
later is still one copy away. Loads are synchronous: the worker side copies them in before
the step's forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import BlockHash, maybe_convert_block_hash

from pdcluster.kv_transfer.connector_metadata import PdConnectorMetadata, TierCopy
from pdcluster.kv_transfer.scheduled_blocks import running_on
from pdcluster.kv_transfer.tier_index import TierIndex

# The medium of the tier's KV events (vLLM's OffloadingConnector says the same), beside the
# engine cache's own events: routers learn which prefixes a worker can load rather than compute.
TIER_MEDIUM = "CPU"

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


@dataclass
class _Tracked:
    request: Request
    block_ids: list[int] = field(default_factory=list)
    stored: int = 0  # blocks [0, stored) were offered to the tier (a resumed request's too)


class TierScheduler:
    def __init__(self, num_slots: int, block_size: int) -> None:
        self.index = TierIndex(num_slots)
        self._block_size = block_size
        self._tracked: dict[str, _Tracked] = {}
        self._hits: dict[str, tuple[int, int]] = {}  # request → (first block, blocks) the tier holds
        self._pending_loads: list[TierCopy] = []
        self._loading: dict[int, bytes] = {}  # engine block → the hash loaded into it, to forget a corrupt one
        self._events: list[KVCacheEvent] = []

    def matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens past the computed prefix that the tier holds, in whole blocks, leaving the
        prompt's last token to compute (vLLM samples from it)."""
        first = num_computed_tokens // self._block_size
        last = (request.num_prompt_tokens - 1) // self._block_size
        hits = self.index.leading_hits(request.block_hashes[first:last])
        self._hits[request.request_id] = (first, hits)
        return hits * self._block_size

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._tracked.setdefault(request.request_id, _Tracked(request))
        first, hits = self._hits.pop(request.request_id, (0, 0))
        if num_external_tokens <= 0 or hits * self._block_size != num_external_tokens:
            return
        hashes = request.block_hashes[first : first + hits]
        block_ids = list(blocks.get_block_ids()[0][first : first + hits])
        self._pending_loads.append(TierCopy(block_ids, self.index.take(hashes)))
        self._loading.update(zip(block_ids, hashes, strict=True))

    def plan(self, meta: PdConnectorMetadata, out: SchedulerOutput) -> None:
        meta.tier_loads, self._pending_loads = self._pending_loads, []
        for new in out.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._store_computed(meta, tracked, new.num_computed_tokens + out.num_scheduled_tokens.get(new.req_id, 0))
        for req_id, tracked, computed in running_on(self._tracked, out.scheduled_cached_reqs):
            self._store_computed(meta, tracked, computed + out.num_scheduled_tokens.get(req_id, 0))

    def _store_computed(self, meta: PdConnectorMetadata, tracked: _Tracked, computed: int) -> None:
        hashes = tracked.request.block_hashes
        full = min(computed // self._block_size, len(hashes), len(tracked.block_ids))
        block_ids, slots, placed = [], [], []
        for i in range(tracked.stored, full):
            slot = self.index.place(hashes[i])
            if slot is not None:
                block_ids.append(tracked.block_ids[i])
                slots.append(slot)
                placed.append(i)
        tracked.stored = max(tracked.stored, full)
        if slots:
            meta.tier_stores.append(TierCopy(block_ids, slots))
            self._events += [self._stored_event(tracked.request, run) for run in _runs(placed)]

    def _stored_event(self, request: Request, run: range) -> BlockStored:
        hashes, size, lora = request.block_hashes, self._block_size, request.lora_request
        return BlockStored(
            block_hashes=[maybe_convert_block_hash(hashes[i]) for i in run],
            parent_block_hash=maybe_convert_block_hash(hashes[run.start - 1]) if run.start else None,
            token_ids=request.all_token_ids[run.start * size : run.stop * size],
            block_size=size,
            lora_id=lora.adapter_id if lora else None,
            medium=TIER_MEDIUM,
            lora_name=lora.name if lora else None,
        )

    def take_events(self) -> list[KVCacheEvent]:
        gone = self.index.take_gone()
        if gone:
            self._events.append(BlockRemoved(block_hashes=[maybe_convert_block_hash(BlockHash(h)) for h in gone], medium=TIER_MEDIUM))
        events, self._events = self._events, []
        return events

    def finished(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        self._hits.pop(request_id, None)

    def load_failed(self, block_ids: set[int]) -> None:
        """Blocks whose tier copy failed its checksum: vLLM recomputes them; the tier forgets them."""
        for block_id in block_ids:
            block_hash = self._loading.pop(block_id, None)
            if block_hash is not None:
                self.index.drop(block_hash)


def _runs(indexes: list[int]) -> list[range]:
    """Ascending indexes as runs of consecutive ones (a BlockStored event is one chain)."""
    runs: list[range] = []
    for i in indexes:
        if runs and runs[-1].stop == i:
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs
