"""Addressing a request's blocks inside one layer of vLLM's paged KV cache.

Chunks move whole blocks. The interior of a block belongs to the attention backend (the
CPU kernels pack K and V per ISA; CUDA backends differ again), so only a whole block is
meaningful to copy between two engines with the same layout; the partial last block of
a prompt moves whole too. The block dimension is read from the tensor vLLM hands the
connector (the one of size `num_blocks`), not assumed: [blocks, ...] on CPU,
[2, blocks, ...] for CUDA flash-attention.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# Payloads arrive as read-only bytes; we only ever copy out of them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class PagedKVLayout:
    block_dim: int
    block_size: int  # tokens per block
    per_block_shape: tuple[int, ...]  # shape of layer.select(block_dim, b)
    dtype: torch.dtype

    @classmethod
    def of(cls, layer: torch.Tensor, num_blocks: int, block_size: int) -> PagedKVLayout:
        shape = tuple(layer.shape)
        if num_blocks not in shape:
            raise ValueError(f"cannot find the block dim ({num_blocks}) in KV shape {shape}")
        block_dim = shape.index(num_blocks)
        per_block = shape[:block_dim] + shape[block_dim + 1 :]
        return cls(block_dim, block_size, per_block, layer.dtype)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def block_bytes(self) -> int:
        return math.prod(self.per_block_shape) * self.dtype.itemsize

    @property
    def signature(self) -> str:
        """What must match between producer and consumer for bytes to be meaningful."""
        dims = "x".join(str(s) for s in self.per_block_shape)
        return f"b{self.block_dim}:{dims}:bs{self.block_size}"

    def views(self, layer: torch.Tensor, block_ids: Sequence[int]) -> Iterator[torch.Tensor]:
        for block_id in block_ids:
            yield layer.select(self.block_dim, block_id)

    def pack(self, layer: torch.Tensor, block_ids: Sequence[int], into: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the given blocks, in order, into one flat byte tensor (the front of `into`
        when given: reusing a buffer avoids page faults on every chunk)."""
        nbytes = len(block_ids) * self.block_bytes
        out = torch.empty(nbytes, dtype=torch.uint8) if into is None else into[:nbytes]
        flat = out.view(self.dtype)
        n = math.prod(self.per_block_shape)
        for i, view in enumerate(self.views(layer, block_ids)):
            flat[i * n : (i + 1) * n].view(view.shape).copy_(view)
        return out

    def payload_parts(self, layer: torch.Tensor, block_ids: Sequence[int], into: torch.Tensor) -> list[memoryview]:
        """The bytes of the given blocks, in order, for sending: views of the cache itself
        where each block is contiguous (vLLM's CPU layout), else packed into `into`."""
        views = list(self.views(layer, block_ids))
        if all(v.is_contiguous() for v in views):
            return [memoryview(v.view(-1).view(torch.uint8).numpy()) for v in views]
        return [memoryview(self.pack(layer, block_ids, into=into).numpy())]

    def unpack(self, payload: bytes | memoryview, layer: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Write a packed payload into the given blocks."""
        flat = torch.frombuffer(payload, dtype=self.dtype)
        n = math.prod(self.per_block_shape)
        for i, view in enumerate(self.views(layer, block_ids)):
            view.copy_(flat[i * n : (i + 1) * n].view(view.shape))


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def split_block_range(start: int, end: int, block_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Cut blocks [start, end) into ranges whose payload fits in `chunk_bytes` (at least
    one block each)."""
    step = max(1, chunk_bytes // block_bytes)
    return [(s, min(s + step, end)) for s in range(start, end, step)]
