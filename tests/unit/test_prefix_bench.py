"""`bench prefix`'s ceiling: the hit rate of one unbounded cache over the trace."""

from __future__ import annotations

import pytest

from pdcluster.bench.prefix_bench import ideal_hit_rate
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
