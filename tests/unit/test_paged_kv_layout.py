"""Blocks of vLLM's paged KV cache, for its CPU and CUDA KV layouts."""

import pytest
import torch

from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout, blocks_for_tokens, split_block_range

BLOCKS, BS = 12, 16


def cpu_layer():  # [blocks, kv_heads, block_size, 2*head_dim]
    return torch.randn(BLOCKS, 2, BS, 64)


def cuda_layer():  # [2, blocks, block_size, kv_heads, head_dim]
    return torch.randn(2, BLOCKS, BS, 2, 32)


@pytest.mark.parametrize("make", [cpu_layer, cuda_layer])
@pytest.mark.parametrize("src_blocks, dst_blocks", [([7], [1]), ([7, 2, 9, 0, 11], [1, 4, 3, 10, 5])])
def test_pack_unpack_round_trip(make, src_blocks, dst_blocks):
    src, dst = make(), torch.zeros_like(make())
    layout = PagedKVLayout.of(src, BLOCKS, BS)
    packed = layout.pack(src, src_blocks)
    assert packed.numel() == len(src_blocks) * layout.block_bytes
    layout.unpack(packed.numpy().tobytes(), dst, dst_blocks)
    for s, d in zip(src_blocks, dst_blocks):
        assert torch.equal(src.select(layout.block_dim, s), dst.select(layout.block_dim, d))
    untouched = [b for b in range(BLOCKS) if b not in dst_blocks]
    assert not layout.pack(dst, untouched).view(torch.float32).any()


def test_layout_is_read_from_the_tensor():
    cpu = PagedKVLayout.of(cpu_layer(), BLOCKS, BS)
    assert (cpu.block_dim, cpu.block_bytes) == (0, 2 * BS * 64 * 4)
    cuda = PagedKVLayout.of(cuda_layer(), BLOCKS, BS)
    assert (cuda.block_dim, cuda.block_bytes) == (1, 2 * BS * 2 * 32 * 4)
    assert cpu.signature != cuda.signature
    with pytest.raises(ValueError):
        PagedKVLayout.of(torch.zeros(5, 6, 7), BLOCKS, BS)


def test_block_ranges():
    assert split_block_range(0, 10, block_bytes=100, chunk_bytes=300) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split_block_range(5, 6, block_bytes=100, chunk_bytes=10) == [(5, 6)]
    assert [blocks_for_tokens(n, 16) for n in (1, 16, 17, 32)] == [1, 1, 2, 2]
