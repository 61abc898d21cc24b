"""`PdConnector`: pdcluster's vLLM KV connector (load it with
`kv_connector="PdConnector", kv_connector_module_path="kv_transfer.connector"`).

Producer (prefill) engines push each layer's KV for a request to the consumer endpoint
named in its `kv_transfer_params` as soon as the layer is computed. Consumer (decode)
engines, when they schedule a request that asks for remote KV, reserve its blocks and let
chunks land straight in them; the request runs once every layer has arrived, or is
recomputed if the load fails. vLLM creates one instance per role: the scheduler side
plans, the worker side moves bytes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from kv_transfer.connector_metadata import (
    CONSUME,
    PRODUCE_TO,
    TRANSFER_ID,
    LoadSpec,
    PdConnectorMetadata,
    SaveSpec,
)
from kv_transfer.kv_endpoint import KVEndpoint
from kv_transfer.paged_kv_layout import blocks_for_tokens
from kv_transfer.process_lifetime import die_with_parent
from kv_transfer.settings import KVTransferSettings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

IDLE_STEP_WAIT_S = 0.005


@dataclass
class _Producing:
    transfer_id: str
    endpoint: str
    num_prompt_tokens: int
    block_ids: list[int]
    sent_blocks: int = 0
    started: bool = False  # the worker side has opened the transfer
    final: bool = False


class PdConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig",
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        # This runs inside vLLM's engine-core and model-worker processes: make them exit
        # with the worker that spawned them instead of lingering after it is killed.
        die_with_parent()
        self._settings = KVTransferSettings.from_extra_config(
            self._kv_transfer_config.kv_connector_extra_config
        )
        self._block_size = vllm_config.cache_config.block_size
        self._engine_id = self._kv_transfer_config.engine_id
        # scheduler side
        self._producing: dict[str, _Producing] = {}
        self._awaiting_send: set[str] = set()
        self._load_claimed: set[str] = set()
        self._pending_loads: list[LoadSpec] = []
        # worker side
        self._kv: KVEndpoint | None = None
        self._layer_index: dict[str, int] = {}

    # ================================ scheduler side ==================================

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if not params.get(CONSUME) or request.request_id in self._load_claimed:
            return 0, False
        remaining = request.num_prompt_tokens - num_computed_tokens
        return (remaining, True) if remaining > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if not params.get(CONSUME) or num_external_tokens <= 0:
            return
        if request.request_id in self._load_claimed:
            return
        self._load_claimed.add(request.request_id)
        num_blocks = blocks_for_tokens(request.num_prompt_tokens, self._block_size)
        self._pending_loads.append(
            LoadSpec(
                request_id=request.request_id,
                transfer_id=params[TRANSFER_ID],
                block_ids=list(blocks.get_block_ids()[0][:num_blocks]),
                # vLLM hands us a block-aligned local prefix hit
                first_block=(request.num_prompt_tokens - num_external_tokens) // self._block_size,
            )
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = PdConnectorMetadata(
            loads=self._pending_loads, idle=scheduler_output.total_num_scheduled_tokens == 0
        )
        self._pending_loads = []
        for new in scheduler_output.scheduled_new_reqs:
            params = (new.sampling_params.extra_args or {}).get("kv_transfer_params") if new.sampling_params else None
            if params and params.get(PRODUCE_TO):
                self._producing[new.req_id] = _Producing(
                    transfer_id=params[TRANSFER_ID],
                    endpoint=params[PRODUCE_TO],
                    num_prompt_tokens=len(new.prompt_token_ids or ()),
                    block_ids=list(new.block_ids[0]),
                )
                self._plan_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._producing.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_blocks[0])
                else:
                    state.block_ids.extend(new_blocks[0])
            self._plan_save(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _plan_save(self, meta: PdConnectorMetadata, req_id: str, num_computed: int, out: "SchedulerOutput") -> None:
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
            )
        )
        state.sent_blocks, state.started, state.final = end, True, final

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._load_claimed.discard(request.request_id)
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

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        self._awaiting_send -= set(connector_output.finished_sending or ())

    def has_pending_push_work(self) -> bool:
        return bool(self._awaiting_send)

    # ================================= worker side ====================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = list(kv_caches)
        self._layer_index = {n: i for i, n in enumerate(names)}
        config = self._kv_transfer_config
        self._kv = KVEndpoint(
            [kv_caches[n] for n in names],
            self._kv_cache_config.num_blocks,
            self._block_size,
            self._settings,
            produce=config.is_kv_producer,
            consume=config.is_kv_consumer,
        )
        logger.info("pdcluster KV endpoint %s (%s, layout %s)", self._kv.address, config.kv_role, self._kv.layout.signature)
        if self._settings.endpoint_file:
            _write_atomically(
                self._settings.endpoint_file,
                json.dumps({"endpoint": self._kv.address, "engine_id": self._engine_id, "pid": os.getpid()}),
            )

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._meta()
        for load in meta.loads:
            self._kv.receiver.expect(load.transfer_id, load.request_id, load.block_ids, load.first_block)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before vLLM schedules the request

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        layer = self._layer_index[layer_name]
        for save in self._meta().saves:
            if save.end > save.start:
                self._kv.sender.add_layer(save, layer)

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        for save in self._meta().saves:
            if save.final:
                self._kv.sender.finalize(save.request_id)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        kv = self._kv
        if self.has_connector_metadata() and self._meta().idle:
            # vLLM steps back to back while it only waits for transfers; pace it.
            kv.progress.wait(IDLE_STEP_WAIT_S)
        kv.progress.clear()
        results = KVConnectorTransferResults()
        if kv.sender is not None:
            results.finished_sending = kv.sender.poll(finished_req_ids)
        if kv.receiver is not None:
            for request_id in finished_req_ids:
                kv.receiver.cancel_request(request_id)
            results.finished_recving, results.failed_recving = kv.receiver.poll()
        return results

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending, results.finished_recving

    def shutdown(self) -> None:
        if self._kv is not None:
            self._kv.close()
            self._kv = None

    # ================================= helpers ========================================

    def _meta(self) -> PdConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdConnectorMetadata)
        return meta


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
