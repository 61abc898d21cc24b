"""`PdConnector`: pdcluster's vLLM KV connector (load it with
`kv_connector="PdConnector", kv_connector_module_path="pdcluster.kv_transfer.connector"`).

Producer (prefill) engines push each layer's KV for a request to the consumer endpoint
named in its `kv_transfer_params` as soon as the layer is computed. Consumer (decode)
engines, when they schedule a request that asks for remote KV, reserve its blocks and let
chunks land straight in them; the request runs once every layer has arrived, or is
recomputed if the load fails. vLLM creates one instance per role; this class is a thin
front over the scheduler side (`PdConnectorScheduler`: plans) and the worker side
(`PdConnectorWorker`: moves bytes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from pdcluster.common.kv_compatibility import kv_compatibility, kv_digest
from pdcluster.common.process_lifetime import die_with_parent
from pdcluster.common.tracing import draw_ids_unseeded
from pdcluster.kv_transfer.connector_metadata import PdConnectorMetadata
from pdcluster.kv_transfer.connector_scheduler import PdConnectorScheduler
from pdcluster.kv_transfer.connector_worker import PdConnectorWorker
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.vllm_version import check_vllm_version

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class PdConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        check_vllm_version()
        # This runs inside vLLM's engine-core and model-worker processes: make them exit
        # with the worker that spawned them instead of lingering after it is killed.
        die_with_parent()
        draw_ids_unseeded()  # our transfer spans here, and vLLM's
        config = self._kv_transfer_config
        settings = KVEndpointSettings.from_extra_config(config.kv_connector_extra_config)
        if role != KVConnectorRole.SCHEDULER:
            settings = settings.model_copy(update={"compatibility": kv_digest(kv_compatibility(vllm_config))})
        block_size = vllm_config.cache_config.block_size
        # Both sides count the tier's slots alike: one engine block, every layer, per slot.
        block_bytes = sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in kv_cache_config.kv_cache_groups)
        tier_slots = settings.tier_bytes // block_bytes if block_bytes else 0
        self._scheduler: PdConnectorScheduler | None = None
        self._worker: PdConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = PdConnectorScheduler(block_size, config.engine_id, tier_slots)
        else:
            self._worker = PdConnectorWorker(
                settings,
                block_size,
                kv_cache_config.num_blocks,
                config.engine_id,
                produce=config.is_kv_producer,
                consume=config.is_kv_consumer,
                tier_slots=tier_slots,
                # vLLM sets it on this process's config once the model is compiled
                compile_seconds=lambda: vllm_config.compilation_config.compilation_time,
            )

    # ================================ scheduler side ==================================

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.update_connector_output(connector_output)

    def has_pending_push_work(self) -> bool:
        return self._scheduler.has_pending_push_work()

    def take_events(self) -> Iterable[KVCacheEvent]:
        return self._scheduler.take_events()

    # ================================= worker side ====================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before vLLM schedules the request

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._worker.save_kv_layer(self._meta(), layer_name)

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self._worker.wait_for_save(self._meta())

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self._worker.transfer_results(self._meta() if self.has_connector_metadata() else None, finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending, results.finished_recving

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    def _meta(self) -> PdConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdConnectorMetadata)
        return meta
