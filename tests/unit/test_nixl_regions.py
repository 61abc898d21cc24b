"""Where one-sided writes go: block regions from a layer's span, runs merged, and the
notice that carries a write's checksum."""

import numpy as np
import pytest
import torch

from pdcluster.kv_transfer.chunk_header import ChunkError
from pdcluster.kv_transfer.nixl_agent import merge_runs
from pdcluster.kv_transfer.nixl_write_notice import NixlWriteNotice
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout, device_checksum

from tests.support.kv_fakes import BLOCK_SIZE, CACHE_BLOCKS, CPU_SHAPE, CUDA_SHAPE


@pytest.mark.parametrize("shape", [CPU_SHAPE, CUDA_SHAPE], ids=["cpu", "cuda-shaped"])
def test_regions_cover_exactly_the_blocks_bytes_in_pack_order(shape):
    layer = torch.randn(shape)
    layout = PagedKVLayout.of(layer, CACHE_BLOCKS, BLOCK_SIZE)
    blocks = [5, 6, 2]
    rows = layout.regions(layout.span(layer), blocks)
    assert rows[:, 1].sum() == len(blocks) * layout.block_bytes
    # Reading the regions back in order gives the blocks' bytes as a producer checksums them.
    base = layer.data_ptr()
    raw = layer.view(-1).view(torch.uint8)
    read = torch.cat([raw[int(a) - base : int(a) - base + int(n)] for a, n, _ in rows])
    pieces = layout.span(layer).pieces
    expected = torch.cat(
        [layer.select(layout.block_dim, b).reshape(pieces, -1)[p].view(torch.uint8) for p in range(pieces) for b in blocks]
    )
    assert torch.equal(read, expected)


def test_the_gpu_checksum_catches_a_flipped_bit_and_blocks_out_of_order():
    # Torch ops only: the same function runs on CUDA tensors (GPU KV), checked here on CPU ones.
    layer = torch.randn(CUDA_SHAPE)
    layout = PagedKVLayout.of(layer, CACHE_BLOCKS, BLOCK_SIZE)
    views = list(layout.views(layer, [3, 4]))
    before = device_checksum(views)
    assert device_checksum(views[::-1]) != before
    layer.select(layout.block_dim, 3)[0].view(-1).view(torch.int32)[7] ^= 1 << 9
    assert device_checksum(list(layout.views(layer, [3, 4]))) != before


def test_runs_contiguous_on_both_sides_merge_into_one_descriptor():
    src = np.array([(100, 10, 0), (110, 10, 0), (120, 10, 0), (500, 10, 0)], dtype=np.uint64)
    dst = np.array([(0, 10, 0), (10, 10, 0), (70, 10, 0), (80, 10, 0)], dtype=np.uint64)
    merged_src, merged_dst = merge_runs(src, dst)
    assert merged_src.tolist() == [[100, 20, 0], [120, 10, 0], [500, 10, 0]]
    assert merged_dst.tolist() == [[0, 20, 0], [70, 10, 0], [80, 10, 0]]


def test_write_notice_round_trips_and_refuses_garbage():
    notice = NixlWriteNotice("t1", 3, 2, 5, 2**63 + 7)
    assert NixlWriteNotice.decode(notice.encode()) == notice
    for bad in (b"\xc1", b"x" * 2000, NixlWriteNotice("t1", 0, 4, 4, 1).encode(), NixlWriteNotice("", 0, 0, 1, 1).encode()):
        with pytest.raises(ChunkError):
            NixlWriteNotice.decode(bad)
