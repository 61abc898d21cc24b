"""An engine profile simple enough to work out by hand: a step is 10 ms plus 1 ms per token."""

from __future__ import annotations

from pdcluster.common.engine_profile import EngineProfile, StepCost

BASE, PER_TOKEN = 0.010, 0.001  # a step: 10 ms plus 1 ms per token computed


def profile(**overrides) -> EngineProfile:
    fields = dict(
        name="hand",
        estimate=True,
        hardware="none",
        model="none",
        block_size=16,
        max_num_seqs=64,
        max_num_batched_tokens=1000,
        max_model_len=4096,
        kv_capacity_tokens=100_000,
        kv_bytes_per_token=1000,
        step=StepCost(base_s=BASE, per_token_s=PER_TOKEN, per_prefill_pair_s=0.0, per_decode_context_token_s=0.0),
        transfer_gbps=1.0,  # 100 tokens of 1000 B: 0.1 ms, hidden behind the prompt's step
        cost_per_hour=3.6,
    )
    return EngineProfile(**{**fields, **overrides})
