"""`bench prefix`'s ceiling: the hit rate of one unbounded cache over the trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdcluster.bench.prefix_bench import ideal_hit_rate, kv_bytes_per_token, new_tokens
from pdcluster.common.engine_profile import load_profile
from pdcluster.planner.workloads import RequestShape


def test_the_ceiling_counts_leading_blocks_an_earlier_request_had():
    # Blocks of 4 tokens; prefix blocks of 4 tokens named by the trace's hash ids.
    first = RequestShape(0.0, 12, 1, prefix_blocks=(1, 2, 3), block_tokens=4, seed=1)
    same_two = RequestShape(1.0, 12, 1, prefix_blocks=(1, 2, 9), block_tokens=4, seed=2)
    whole = RequestShape(2.0, 12, 1, prefix_blocks=(1, 2, 3), block_tokens=4, seed=3)
    other = RequestShape(3.0, 8, 1, prefix_blocks=(5, 2), block_tokens=4, seed=4)  # a new first block: nothing after it counts
    # Hits: 0, 8, 11 (all but the last token, which vLLM always computes), 0.
    assert ideal_hit_rate([first, same_two, whole, other], 4) == pytest.approx((8 + 11) / 44)
    assert ideal_hit_rate([], 4) == 0.0
    # The new tokens, whose KV a turn must compute and move at least once: the rest.
    assert new_tokens([first, same_two, whole, other], 4) == 44 - 19


def test_kv_bytes_per_token_is_what_vllm_sizes_the_tiny_models_kv_by(model_dir):
    # The profile measured here took it from vLLM's model config (layers, KV heads, head size; float32).
    profile = load_profile(Path(__file__).parents[2] / "bench" / "profiles" / "cpu1-tiny.json")
    assert Path(profile.model).name == Path(model_dir).name
    assert kv_bytes_per_token(model_dir) == profile.kv_bytes_per_token
