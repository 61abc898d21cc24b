"""Addressing a request's prompt tokens inside one layer of vLLM's paged KV cache.

The layout is read from the tensor vLLM hands the connector, not assumed: the block
dimension is the one of size `num_blocks` and the token dimension the one of size
`block_size` (CPU: [blocks, kv_heads, block_size, 2*head_dim]; CUDA flash-attn:
[2, blocks, block_size, kv_heads, head_dim]). A token range maps to one strided view per
block it touches; chunks carry those views packed back to back.
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
    token_dim: int  # in the full layer tensor
    block_size: int
    per_block_shape: tuple[int, ...]  # shape of layer.select(block_dim, b)
    dtype: torch.dtype

    @classmethod
    def of(cls, layer: torch.Tensor, num_blocks: int, block_size: int) -> "PagedKVLayout":
        shape = tuple(layer.shape)
        block_dims = [d for d, s in enumerate(shape) if s == num_blocks]
        token_dims = [d for d, s in enumerate(shape) if s == block_size]
        if not block_dims or not token_dims:
            raise ValueError(
                f"cannot find block ({num_blocks}) and token ({block_size}) dims in KV shape {shape}"
            )
        block_dim = block_dims[0]
        token_dim = next((d for d in reversed(token_dims) if d != block_dim), None)
        if token_dim is None:
            raise ValueError(f"KV shape {shape} has no token dim apart from its block dim")
        per_block = shape[:block_dim] + shape[block_dim + 1 :]
        return cls(block_dim, token_dim, block_size, per_block, layer.dtype)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def token_bytes(self) -> int:
        elems = math.prod(self.per_block_shape) // self.block_size
        return elems * self.dtype.itemsize

    @property
    def signature(self) -> str:
        """What must match between producer and consumer for bytes to be meaningful."""
        dims = "x".join(str(s) for s in self.per_block_shape)
        return f"b{self.block_dim}t{self.token_dim}:{dims}"

    def _token_dim_in_block(self) -> int:
        return self.token_dim - 1 if self.token_dim > self.block_dim else self.token_dim

    def views(
        self, layer: torch.Tensor, block_ids: Sequence[int], start: int, end: int
    ) -> Iterator[torch.Tensor]:
        """One view per block touched by prompt tokens [start, end)."""
        tdim = self._token_dim_in_block()
        bs = self.block_size
        for index in range(start // bs, (end - 1) // bs + 1):
            lo = max(start, index * bs) - index * bs
            hi = min(end, (index + 1) * bs) - index * bs
            yield layer.select(self.block_dim, block_ids[index]).narrow(tdim, lo, hi - lo)

    def pack(
        self, layer: torch.Tensor, block_ids: Sequence[int], start: int, end: int
    ) -> torch.Tensor:
        """Copy tokens [start, end) into one flat byte tensor."""
        out = torch.empty((end - start) * self.token_bytes, dtype=torch.uint8)
        flat = out.view(self.dtype)
        offset = 0
        for view in self.views(layer, block_ids, start, end):
            n = view.numel()
            flat[offset : offset + n].view(view.shape).copy_(view)
            offset += n
        return out

    def unpack(
        self,
        payload: bytes | memoryview,
        layer: torch.Tensor,
        block_ids: Sequence[int],
        start: int,
        end: int,
    ) -> None:
        """Write a packed payload for tokens [start, end) into the given blocks."""
        flat = torch.frombuffer(payload, dtype=self.dtype)
        offset = 0
        for view in self.views(layer, block_ids, start, end):
            n = view.numel()
            view.copy_(flat[offset : offset + n].view(view.shape))
            offset += n


def split_token_range(start: int, end: int, token_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Cut [start, end) into ranges whose payload fits in `chunk_bytes`."""
    step = max(1, chunk_bytes // token_bytes)
    return [(s, min(s + step, end)) for s in range(start, end, step)]
