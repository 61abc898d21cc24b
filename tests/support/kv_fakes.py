"""Real paged KV tensors shaped like vLLM's CPU layout (or its CUDA one), for transfer
tests that do not need a whole engine."""

from __future__ import annotations

import torch

from pdcluster.kv_transfer.kv_endpoint import KVEndpoint
from pdcluster.kv_transfer.settings import KVTransferSettings

NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD2 = 64, 2, 16, 64


CPU_SHAPE = (NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD2)
CUDA_SHAPE = (2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD2 // 2)  # blocks not contiguous


def paged_layers(num_layers: int = 3, seed: int | None = 0, shape=CPU_SHAPE) -> list[torch.Tensor]:
    if seed is None:
        return [torch.zeros(shape) for _ in range(num_layers)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(num_layers)]


def endpoint(layers: list[torch.Tensor], settings: KVTransferSettings, *, consume: bool) -> KVEndpoint:
    return KVEndpoint(layers, NUM_BLOCKS, BLOCK_SIZE, settings, produce=True, consume=consume)
