"""Real paged KV tensors shaped like vLLM's CPU layout (or its CUDA one), and the steps of
a transfer as vLLM drives them, for transfer tests that do not need a whole engine."""

from __future__ import annotations

import time

import torch

from pdcluster.kv_transfer.connector_metadata import SaveSpec
from pdcluster.kv_transfer.kv_endpoint import KVEndpoint
from pdcluster.kv_transfer.settings import KVEndpointSettings

CACHE_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD2 = 64, 2, 16, 64


CPU_SHAPE = (CACHE_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD2)
CUDA_SHAPE = (2, CACHE_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD2 // 2)  # blocks not contiguous


def paged_layers(num_layers: int = 3, seed: int | None = 0, shape=CPU_SHAPE) -> list[torch.Tensor]:
    if seed is None:
        return [torch.zeros(shape) for _ in range(num_layers)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(num_layers)]


def endpoint(layers: list[torch.Tensor], settings: KVEndpointSettings, *, consume: bool) -> KVEndpoint:
    return KVEndpoint(layers, CACHE_BLOCKS, BLOCK_SIZE, settings, produce=True, consume=consume)


SRC_BLOCKS = [3, 7, 9, 21, 40]
DST_BLOCKS = [10, 2, 41, 33, 5]
NUM_BLOCKS = len(SRC_BLOCKS)


def send(prod, consumer_address, transfer_id="t1", request_id="r1", steps=1, consumer_holds=0):
    """Announce the prompt's blocks layer by layer as vLLM would, in `steps` steps (chunked
    prefill: each step holds the blocks allocated so far). `consumer_holds`: prompt tokens the
    router would believe the consumer holds."""
    bounds = [round(NUM_BLOCKS * i / steps) for i in range(steps + 1)]
    for i in range(steps):
        spec = SaveSpec(
            request_id,
            transfer_id,
            consumer_address,
            SRC_BLOCKS[: bounds[i + 1]],
            bounds[i],
            bounds[i + 1],
            first=i == 0,
            final=i == steps - 1,
            prompt_blocks=len(SRC_BLOCKS),
            consumer_holds=consumer_holds if i == 0 else 0,
        )
        for layer in range(len(prod.layers)):
            prod.sender.add_layer(spec, layer)
    prod.sender.finalize(request_id)


def wait_until(fn, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = fn()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def poll_consumer(cons):
    collected = (set(), set())

    def step():
        finished, failed = cons.receiver.poll()
        collected[0].update(finished)
        collected[1].update(failed)
        return collected[0]

    wait_until(step)
    return collected


def assert_same_kv(prod, cons, start=0):
    for layer in range(len(prod.layers)):
        a = prod.layout.pack(prod.layers[layer], SRC_BLOCKS[start:])
        b = cons.layout.pack(cons.layers[layer], DST_BLOCKS[start:])
        assert torch.equal(a, b), f"layer {layer} differs"
