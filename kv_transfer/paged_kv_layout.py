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

import numpy as np
import torch

from pdcluster.kv_transfer.chunk_header import payload_checksum

# Payloads arrive as read-only bytes; we only ever copy out of them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class LayerSpan:
    """Where one layer's blocks sit in memory, for one-sided writes: piece `p` of block
    `b` starts at `base + p * piece_stride + b * block_stride`. A block is one piece where
    it is contiguous (vLLM's CPU layout), two for CUDA's [2, blocks, ...] (K and V)."""

    base: int
    block_stride: int
    piece_stride: int
    pieces: int
    device: int


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

    def payload_parts(self, layer: torch.Tensor, block_ids: Sequence[int], into: torch.Tensor | None = None) -> list[memoryview]:
        """The bytes of the given blocks, in order, for sending: views of the cache itself
        where each block is contiguous (vLLM's CPU layout), else packed into `into`."""
        views = list(self.views(layer, block_ids))
        if all(v.is_contiguous() for v in views):
            return [tensor_bytes(v) for v in views]
        return [tensor_bytes(self.pack(layer, block_ids, into=into))]

    def checksum(self, layer: torch.Tensor, block_ids: Sequence[int], scratch: torch.Tensor | None = None) -> int:
        """A checksum of the given blocks' bytes, in order: xxh3 in host memory (what a chunk's
        header carries); on a GPU, a position-weighted sum computed there, so checking a
        write costs no copy to the host."""
        if layer.device.type != "cpu":
            return device_checksum(list(self.views(layer, block_ids)))
        return payload_checksum(*self.payload_parts(layer, block_ids, into=scratch))

    def span(self, layer: torch.Tensor) -> LayerSpan:
        if not layer.is_contiguous():
            raise ValueError("one-sided KV writes need a contiguous KV cache tensor per layer")
        item = layer.element_size()
        return LayerSpan(
            base=layer.data_ptr(),
            block_stride=layer.stride(self.block_dim) * item,
            piece_stride=layer.stride(self.block_dim - 1) * item if self.block_dim else 0,
            pieces=math.prod(layer.shape[: self.block_dim]),
            device=max(layer.get_device(), 0),
        )

    def regions(self, span: LayerSpan, block_ids: Sequence[int]) -> np.ndarray:
        """(address, bytes, device) rows covering the given blocks, piece by piece: the
        same order on both sides of a write for the same block count."""
        blocks = np.asarray(block_ids, dtype=np.uint64)
        pieces = np.arange(span.pieces, dtype=np.uint64)[:, None]
        rows = np.empty((span.pieces * len(blocks), 3), dtype=np.uint64)
        rows[:, 0] = (
            np.uint64(span.base) + pieces * np.uint64(span.piece_stride) + blocks[None, :] * np.uint64(span.block_stride)
        ).reshape(-1)
        rows[:, 1] = self.block_bytes // span.pieces
        rows[:, 2] = span.device
        return rows

    def unpack(self, payload: bytes | memoryview, layer: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Write a packed payload into the given blocks."""
        flat = torch.frombuffer(payload, dtype=self.dtype)
        n = math.prod(self.per_block_shape)
        for i, view in enumerate(self.views(layer, block_ids)):
            view.copy_(flat[i * n : (i + 1) * n].view(view.shape))


def device_checksum(views: Sequence[torch.Tensor]) -> int:
    """Sum of the bytes' 32-bit words, each weighted by its position (mod 2^63): catches a
    flipped bit and words out of place, with torch ops that run on any device."""
    words = torch.cat([v.reshape(-1).view(torch.int32) for v in views]).to(torch.int64)
    weights = torch.arange(1, len(words) + 1, dtype=torch.int64, device=words.device)
    return int((words * weights).sum().item()) & (2**63 - 1)


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def split_block_range(start: int, end: int, block_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Cut blocks [start, end) into ranges whose payload fits in `chunk_bytes` (at least
    one block each)."""
    step = max(1, chunk_bytes // block_bytes)
    return [(s, min(s + step, end)) for s in range(start, end, step)]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as bytes (no copy)."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy arrays are buffers
