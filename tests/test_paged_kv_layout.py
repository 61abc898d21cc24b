"""Token ranges to paged-cache views, for vLLM's CPU and CUDA KV layouts."""

import pytest
import torch

from kv_transfer.paged_kv_layout import PagedKVLayout, split_token_range

BLOCKS, BS = 12, 16


def cpu_layer():  # [blocks, kv_heads, block_size, 2*head_dim]
    return torch.randn(BLOCKS, 2, BS, 64)


def cuda_layer():  # [2, blocks, block_size, kv_heads, head_dim]
    return torch.randn(2, BLOCKS, BS, 2, 32)


@pytest.mark.parametrize("make", [cpu_layer, cuda_layer])
@pytest.mark.parametrize("start, end", [(0, 1), (0, 16), (5, 40), (16, 48), (31, 33), (0, 70)])
def test_pack_unpack_round_trip(make, start, end):
    src, dst = make(), torch.zeros_like(make())
    layout = PagedKVLayout.of(src, BLOCKS, BS)
    src_blocks, dst_blocks = [7, 2, 9, 0, 11], [1, 4, 3, 10, 5]
    packed = layout.pack(src, src_blocks, start, end)
    assert packed.numel() == (end - start) * layout.token_bytes
    layout.unpack(packed.numpy().tobytes(), dst, dst_blocks, start, end)
    assert torch.equal(layout.pack(dst, dst_blocks, start, end), packed)
    # nothing outside the range was touched
    before = layout.pack(dst, dst_blocks, 0, start) if start else torch.empty(0, dtype=torch.uint8)
    assert not before.view(torch.float32).any()


def test_layout_is_read_from_the_tensor():
    cpu = PagedKVLayout.of(cpu_layer(), BLOCKS, BS)
    assert (cpu.block_dim, cpu.token_dim, cpu.token_bytes) == (0, 2, 2 * 64 * 4)
    cuda = PagedKVLayout.of(cuda_layer(), BLOCKS, BS)
    assert (cuda.block_dim, cuda.token_dim, cuda.token_bytes) == (1, 2, 2 * 2 * 32 * 4)
    assert cpu.signature != cuda.signature
    with pytest.raises(ValueError):
        PagedKVLayout.of(torch.zeros(5, 6, 7), BLOCKS, BS)


def test_split_token_range_respects_chunk_size():
    assert split_token_range(0, 10, token_bytes=100, chunk_bytes=300) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split_token_range(5, 6, token_bytes=100, chunk_bytes=10) == [(5, 6)]
