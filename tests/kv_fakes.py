"""Real paged KV tensors (shaped like vLLM's CPU layout) and real endpoints for
transfer tests that do not need a whole engine."""

from __future__ import annotations

import torch

from kv_transfer.grpc_transport import GrpcKVClient, KVTransferService, kv_stats_from, start_kv_server
from kv_transfer.kv_io_loop import KVIOLoop
from kv_transfer.kv_receiver import KVReceiver
from kv_transfer.kv_sender import KVSender
from kv_transfer.paged_kv_layout import PagedKVLayout
from kv_transfer.settings import KVTransferSettings
from kv_transfer.transfer_stats import TransferStats

NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD2 = 64, 2, 16, 64


def paged_layers(num_layers: int = 3, seed: int | None = 0) -> list[torch.Tensor]:
    shape = (NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD2)
    if seed is None:
        return [torch.zeros(shape) for _ in range(num_layers)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(num_layers)]


class Endpoint:
    """One engine's KV side: layers, an I/O loop, a served KVTransfer service."""

    def __init__(self, layers: list[torch.Tensor], settings: KVTransferSettings, consumer: bool) -> None:
        self.layers = layers
        self.settings = settings
        self.stats = TransferStats()
        self.layout = PagedKVLayout.of(layers[0], NUM_BLOCKS, BLOCK_SIZE)
        self.io = KVIOLoop()
        self.receiver = KVReceiver(layers, self.layout, settings, self.stats) if consumer else None
        self.client = GrpcKVClient(settings)
        self.sender = KVSender(self.io, self.client, layers, self.layout, settings, self.stats)
        service = KVTransferService(self.receiver, lambda: kv_stats_from(self.stats.snapshot()), settings.check_token)
        self.server, port = self.io.run(start_kv_server(service, settings))
        self.endpoint = f"127.0.0.1:{port}"

    def close(self) -> None:
        self.io.run(self.client.close())
        self.io.run(self.server.stop(None))
        self.io.stop()
