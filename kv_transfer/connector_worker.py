"""The worker side of `PdConnector`: moves the bytes. It owns the engine's KV endpoint
(the paged layers, the KVTransfer service, a sender and/or receiver) and carries out what
the scheduler side planned for this step."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from pdcluster.common.files import write_atomically
from pdcluster.kv_transfer.connector_metadata import PdConnectorMetadata
from pdcluster.kv_transfer.host_kv_tier import HostKVTier
from pdcluster.kv_transfer.kv_endpoint import KVEndpoint
from pdcluster.kv_transfer.settings import KVEndpointSettings

logger = logging.getLogger(__name__)

IDLE_STEP_WAIT_S = 0.005


class PdConnectorWorker:
    def __init__(
        self,
        settings: KVEndpointSettings,
        block_size: int,
        num_blocks: int,
        engine_id: str,
        *,
        produce: bool,
        consume: bool,
        tier_slots: int = 0,
        compile_seconds: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._settings = settings
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._engine_id = engine_id
        self._produce, self._consume = produce, consume
        self._compile_seconds = compile_seconds
        self.kv: KVEndpoint | None = None
        self._layer_index: dict[str, int] = {}
        self._tier_slots = tier_slots
        self.tier: HostKVTier | None = None
        self._load_errors: set[int] = set()
        self._unsendable: set[str] = set()  # this step's requests whose tier load failed

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = list(kv_caches)
        self._layer_index = {n: i for i, n in enumerate(names)}
        self.kv = KVEndpoint(
            [kv_caches[n] for n in names],
            self._num_blocks,
            self._block_size,
            self._settings,
            produce=self._produce,
            consume=self._consume,
            compile_seconds=self._compile_seconds,
        )
        logger.info("pdcluster KV endpoint %s (layout %s)", self.kv.address, self.kv.layout.signature)
        if self._tier_slots:
            self.tier = HostKVTier(self.kv.layers, self.kv.layout, self._tier_slots, self._settings.tier_dir, self._engine_id)
            logger.info("pdcluster host KV tier: %d blocks in %s", self._tier_slots, self.tier.path)
        if self._settings.endpoint_file:
            record = {"endpoint": self.kv.address, "engine_id": self._engine_id, "pid": os.getpid()}
            write_atomically(self._settings.endpoint_file, json.dumps(record))

    def start_load_kv(self, meta: PdConnectorMetadata) -> None:
        for copy in meta.tier_loads:
            failed = self.tier.load(copy.slots, copy.block_ids)
            self._load_errors |= failed
            self.kv.stats.add(tier_blocks_loaded=len(copy.block_ids) - len(failed), tier_checksum_failures=len(failed))
        if self._load_errors and meta.saves:
            # vLLM recomputes the failed blocks later, but this step's layers would carry
            # what they held before: the consumer recomputes the prompt instead.
            for save in meta.saves:
                if self._load_errors.intersection(save.block_ids):
                    self._unsendable.add(save.request_id)
                    self.kv.sender.fail(save, "a host KV tier block failed its checksum")
        for load in meta.loads:
            self.kv.receiver.expect(load.transfer_id, load.request_id, load.block_ids, load.first_block, load.producer, load.trace)

    def save_kv_layer(self, meta: PdConnectorMetadata, layer_name: str) -> None:
        layer = self._layer_index[layer_name]
        for save in meta.saves:
            if save.end > save.start and save.request_id not in self._unsendable:
                self.kv.sender.add_layer(save, layer)

    def wait_for_save(self, meta: PdConnectorMetadata) -> None:
        for save in meta.saves:
            if save.final and save.request_id not in self._unsendable:
                self.kv.sender.finalize(save.request_id)
        self._unsendable.clear()
        for copy in meta.tier_stores:
            self.tier.store(copy.block_ids, copy.slots)
            self.kv.stats.add(tier_blocks_stored=len(copy.block_ids))

    def take_load_errors(self) -> set[int]:
        """Engine blocks a tier load left unwritten (vLLM recomputes them), once each."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def transfer_results(self, meta: PdConnectorMetadata | None, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Requests whose sends finished, and whose loads finished or failed, since the last step."""
        kv = self.kv
        if meta is not None and meta.idle:
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

    def shutdown(self) -> None:
        if self.tier is not None:
            self.tier.close()
            self.tier = None
        if self.kv is not None:
            self.kv.close()
            self.kv = None
