"""The scheduler side of `PdConnector`: which requests load or produce remote KV, and when
their blocks may be freed. It runs in vLLM's engine core next to the Scheduler, holds no
tensors and does no I/O; each step it tells the worker side what to move
(`PdConnectorMetadata`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pdcluster.kv_transfer.connector_metadata import (
    CONSUME,
    CONSUME_FROM,
    CONSUMER_HOLDS,
    PRODUCE_TO,
    PULL_FROM,
    PULL_ID,
    PULL_TOKENS,
    TRANSFER_ID,
    LoadSpec,
    PdConnectorMetadata,
    SaveSpec,
)
from pdcluster.kv_transfer.paged_kv_layout import blocks_for_tokens
from pdcluster.kv_transfer.scheduled_blocks import running_on
from pdcluster.kv_transfer.tier_scheduler import TierScheduler

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


@dataclass(frozen=True)
class _RemoteLoad:
    """KV a request loads from another engine: the prompt's tokens up to `end`, by `transfer_id`."""

    transfer_id: str
    end: int
    producer: str


def remote_load(request: Request) -> _RemoteLoad | None:
    """What the request's `kv_transfer_params` ask this engine to load: a decode worker's whole
    prompt (CONSUME), or a prefill worker's prefix pulled from a peer (PULL_ID); None: nothing."""
    params = request.kv_transfer_params or {}
    if params.get(CONSUME):
        return _RemoteLoad(params[TRANSFER_ID], request.num_prompt_tokens, params.get(CONSUME_FROM, ""))
    if params.get(PULL_ID):
        # The last prompt token is always computed here: it samples the first output token.
        end = min(int(params.get(PULL_TOKENS, 0)), request.num_prompt_tokens - 1)
        return _RemoteLoad(params[PULL_ID], end, params.get(PULL_FROM, ""))
    return None


@dataclass
class _Producing:
    transfer_id: str
    endpoint: str
    num_prompt_tokens: int
    block_ids: list[int]
    sent_blocks: int = 0
    started: bool = False  # the worker side has opened the transfer
    final: bool = False
    trace: Mapping[str, str] = field(default_factory=dict)
    consumer_holds: int = 0


class PdConnectorScheduler:
    def __init__(self, block_size: int, engine_id: str, tier_slots: int = 0) -> None:
        self._block_size = block_size
        self._tier = TierScheduler(tier_slots, block_size) if tier_slots > 0 else None
        self._engine_id = engine_id
        self._producing: dict[str, _Producing] = {}
        self._awaiting_send: set[str] = set()  # finished requests whose blocks a transfer still reads
        self._load_claimed: set[str] = set()  # consumer requests whose load is planned
        self._pending_loads: list[LoadSpec] = []
        # Producer requests' trace headers (vLLM's, on the Request), from their allocation to
        # their first step's metadata (whose request data does not carry them).
        self._traces: dict[str, Mapping[str, str]] = {}

    # -- consumer: reserve blocks for KV that will arrive; others: load from the tier ----

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        load = remote_load(request)
        if load is None:
            return (self._tier.matched_tokens(request, num_computed_tokens) if self._tier else 0), False
        if request.request_id in self._load_claimed:
            return 0, False
        remaining = load.end - num_computed_tokens
        return (remaining, True) if remaining > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if params.get(PRODUCE_TO) and request.trace_headers:
            self._traces[request.request_id] = dict(request.trace_headers)
        load = remote_load(request)
        if self._tier is not None:
            self._tier.after_alloc(request, blocks, 0 if load else num_external_tokens)
        if load is None or num_external_tokens <= 0 or request.request_id in self._load_claimed:
            return
        self._load_claimed.add(request.request_id)
        num_blocks = blocks_for_tokens(load.end, self._block_size)
        self._pending_loads.append(
            LoadSpec(
                request_id=request.request_id,
                transfer_id=load.transfer_id,
                block_ids=list(blocks.get_block_ids()[0][:num_blocks]),
                # vLLM hands us a block-aligned local prefix hit
                first_block=(load.end - num_external_tokens) // self._block_size,
                producer=load.producer,
                trace=dict(request.trace_headers or {}),
            )
        )

    # -- every step ---------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PdConnectorMetadata:
        meta = PdConnectorMetadata(loads=self._pending_loads, idle=scheduler_output.total_num_scheduled_tokens == 0)
        self._pending_loads = []
        if self._tier is not None:
            self._tier.plan(meta, scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            params = (new.sampling_params.extra_args or {}).get("kv_transfer_params") if new.sampling_params else None
            if params and params.get(PRODUCE_TO):
                self._producing[new.req_id] = _Producing(
                    transfer_id=params[TRANSFER_ID],
                    endpoint=params[PRODUCE_TO],
                    num_prompt_tokens=len(new.prompt_token_ids or ()),
                    block_ids=list(new.block_ids[0]),
                    trace=self._traces.pop(new.req_id, {}),
                    consumer_holds=int(params.get(CONSUMER_HOLDS, 0)),
                )
                self._plan_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        for req_id, _, computed in running_on(self._producing, scheduler_output.scheduled_cached_reqs):
            self._plan_save(meta, req_id, computed, scheduler_output)
        return meta

    def _plan_save(self, meta: PdConnectorMetadata, req_id: str, num_computed: int, out: SchedulerOutput) -> None:
        state = self._producing[req_id]
        if state.final:
            return
        computed = min(num_computed + out.num_scheduled_tokens.get(req_id, 0), state.num_prompt_tokens)
        final = computed == state.num_prompt_tokens
        # Full blocks as soon as they are computed; the partial last one with the prompt's end.
        end = blocks_for_tokens(computed, self._block_size) if final else computed // self._block_size
        if end <= state.sent_blocks and not final:
            return
        meta.saves.append(
            SaveSpec(
                request_id=req_id,
                transfer_id=state.transfer_id,
                endpoint=state.endpoint,
                block_ids=list(state.block_ids),
                start=state.sent_blocks,
                end=end,
                first=not state.started,
                final=final,
                prompt_blocks=blocks_for_tokens(state.num_prompt_tokens, self._block_size),
                trace=state.trace if not state.started else {},
                consumer_holds=state.consumer_holds if not state.started else 0,
            )
        )
        state.sent_blocks, state.started, state.final = end, True, final

    # -- producer: hold blocks until their transfer is done ----------------------------

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._load_claimed.discard(request.request_id)
        self._traces.pop(request.request_id, None)
        if self._tier is not None:
            self._tier.finished(request.request_id)
        state = self._producing.pop(request.request_id, None)
        if state is None or not state.started:
            return False, None
        # Hold the blocks until the worker side reports the transfer done.
        self._awaiting_send.add(request.request_id)
        return True, {
            TRANSFER_ID: state.transfer_id,
            "engine_id": self._engine_id,
            "num_prompt_tokens": state.num_prompt_tokens,
            "sent_blocks": state.sent_blocks,
        }

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._awaiting_send -= set(connector_output.finished_sending or ())
        if self._tier is not None and connector_output.invalid_block_ids:
            self._tier.load_failed(connector_output.invalid_block_ids)

    def has_pending_push_work(self) -> bool:
        return bool(self._awaiting_send)

    def take_events(self) -> list[KVCacheEvent]:
        return self._tier.take_events() if self._tier is not None else []
