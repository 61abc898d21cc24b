"""The simulator on cases small enough to work out by hand, with the router's own policies
deciding where each request goes."""

from __future__ import annotations

import pytest

from pdcluster.planner.simulator import ClusterShape, ClusterSimulation, simulate
from pdcluster.planner.workloads import RequestShape
from pdcluster.router.config import RouterConfig

from tests.support.hand_profile import BASE, PER_TOKEN, profile


def run(shape: ClusterShape, requests: list[RequestShape]) -> ClusterSimulation:
    sim = ClusterSimulation(shape)
    sim.run(requests)
    return sim


def test_one_request_disaggregated():
    p = profile()
    sim = run(ClusterShape(p, p, 1, 1), [RequestShape(0.0, 100, 5)])
    (o,) = sim.outcomes
    assert o.placement == "remote"
    # Prefill: one step of 100 tokens (0.11 s); decode: the prompt's last token then 4 more, 11 ms each.
    assert o.ttft == pytest.approx(0.110 + 0.011)
    assert o.gaps == pytest.approx([0.011] * 4)
    assert o.tpot == pytest.approx(0.011)
    assert sim.prefills[0].engine.busy_seconds == pytest.approx(0.110)
    assert sim.decodes[0].engine.busy_seconds == pytest.approx(0.055)


def test_one_request_colocated_and_cost():
    p = profile()
    report = simulate(ClusterShape(None, p, 0, 1), [RequestShape(0.0, 100, 5)], slo_ttft_ms=1000, slo_itl_ms=100)
    assert report["placements"] == {"no_prefill_worker": 1}
    assert report["ttft_ms"]["p50"] == pytest.approx(110.0)  # the prompt's step makes the first token
    assert report["duration_s"] == pytest.approx(0.110 + 4 * 0.011)
    # $3.60/h = $0.001/s over the run, per token of each kind.
    cost = 0.001 * report["duration_s"]
    assert report["cost_usd_per_million_tokens"]["input"] == pytest.approx(cost / 100 * 1e6, rel=1e-3)
    assert report["cost_usd_per_million_tokens"]["output"] == pytest.approx(cost / 5 * 1e6, rel=1e-3)
    assert report["pools"]["decode"]["utilization"] == pytest.approx(1.0)
    assert report["slo_attainment"] == 1.0


def test_saturated_prefill_pool_queues_prompts_one_step_each():
    # Budget 100 tokens a step: each prompt takes a whole step, so the k-th waits for k before it.
    p = profile(max_num_batched_tokens=100)
    requests = [RequestShape(0.0, 100, 2, seed=i) for i in range(6)]
    sim = run(ClusterShape(p, profile(), 1, 1), requests)
    ttfts = sorted(o.ttft for o in sim.outcomes)
    for k, ttft in enumerate(ttfts):
        prefilled = (k + 1) * 0.110
        assert prefilled + 0.011 <= ttft + 1e-9 <= prefilled + 0.011 + 0.02  # at most one decode step in the way
    assert sim.prefills[0].engine.busy_seconds == pytest.approx(6 * 0.110)
    report = simulate(ClusterShape(p, profile(), 1, 1), requests, slo_ttft_ms=300, slo_itl_ms=100)
    assert report["slo_attainment"] == pytest.approx(2 / 6, abs=1e-3)  # only the first two prompts start within 300 ms


def test_prefix_hits_go_to_the_worker_that_holds_them_and_skip_their_tokens():
    p = profile()
    # 160-token prompts whose first 128 tokens (two 64-token prefix blocks) are the same.
    first = RequestShape(0.0, 160, 2, prefix_blocks=(7, 8, 100), block_tokens=64, seed=1)
    second = RequestShape(10.0, 160, 2, prefix_blocks=(7, 8, 200), block_tokens=64, seed=2)
    # Every prompt over a prefill worker (no rest short enough to compute on its decode worker).
    sim = run(ClusterShape(p, p, 2, 1, RouterConfig(bypass_prefill_below_tokens=0)), [first, second])
    a, b = sim.outcomes
    assert a.ttft == pytest.approx(0.010 + 0.160 + 0.011)
    assert b.ttft == pytest.approx(0.010 + 0.032 + 0.011)  # 128 tokens cached: 32 computed
    # The router's prefix index sent the second to the worker holding the prefix.
    busy = sorted(r.engine.busy_seconds for r in sim.prefills)
    assert busy == pytest.approx([0.0, 0.170 + 0.042])


def test_a_prefix_only_the_decode_worker_holds_is_pulled_from_it_not_computed():
    p = profile()
    # The first turn is short: computed on the decode worker alone. The next adds 272 tokens:
    # over a prefill worker, which holds none of it and pulls the 128 the decode worker holds.
    first = RequestShape(0.0, 160, 2, prefix_blocks=(7, 8, 100), block_tokens=64, seed=1)
    second = RequestShape(10.0, 400, 2, prefix_blocks=(7, 8, 200, 201, 202, 203), block_tokens=64, seed=2)

    def outcomes(pull_min: int):
        sim = run(ClusterShape(p, p, 2, 1, RouterConfig(bypass_prefill_below_tokens=200, peer_pull_min_tokens=pull_min)), [first, second])
        return sim, sim.outcomes[1]

    sim, pulled = outcomes(64)
    assert (sim.outcomes[0].placement, pulled.placement) == ("short_prompt", "remote")
    assert sum(r.engine.prompt_tokens["peer"] for r in sim.prefills) == 128
    # The pull: the decode worker's last block of it (10 + 16 ms) and 128 tokens of KV; then
    # 272 tokens computed (10 + 272 ms) and the decode worker's step (11 ms).
    assert pulled.ttft == pytest.approx(0.026 + 128 * 1000 / 1e9 + 0.282 + 0.011)
    _, computed = outcomes(0)  # pulls off: all 400 computed
    assert computed.ttft == pytest.approx(0.410 + 0.011)


def test_a_prompt_its_decode_worker_holds_but_a_short_rest_is_computed_there():
    p = profile()
    first = RequestShape(0.0, 160, 2, prefix_blocks=(7, 8, 100), block_tokens=64, seed=1)
    second = RequestShape(10.0, 160, 2, prefix_blocks=(7, 8, 200), block_tokens=64, seed=2)
    # The first prompt's KV landed on the decode worker and stays in its cache, as its events
    # tell the router: the second's 32 new tokens (under the 64 of --bypass-prefill-below)
    # are computed there, and nothing moves.
    sim = run(ClusterShape(p, p, 2, 1), [first, second])
    a, b = sim.outcomes
    assert (a.placement, b.placement) == ("remote", "decode_holds_prefix")
    assert b.ttft == pytest.approx(0.010 + 0.032)  # one step of 32 tokens on the decode worker
    assert sim.decodes[0].engine.prompt_tokens == {"engine_cache": 128, "tier": 0, "peer": 0, "computed": 32}
    assert sum(r.engine.busy_seconds for r in sim.prefills) == pytest.approx(0.170)  # only the first
    # Round-robin ignores what workers hold.
    assert run(ClusterShape(p, p, 2, 1, RouterConfig(prefill_routing="round-robin")), [first, second]).outcomes[1].placement == "remote"


def test_router_policies_decide_placement():
    p = profile()
    short = RequestShape(0.0, 20, 2)  # under the router's bypass threshold (64)
    sim = run(ClusterShape(p, p, 1, 1, RouterConfig(bypass_prefill_below_tokens=64)), [short])
    assert sim.outcomes[0].placement == "short_prompt"
    assert sim.prefills[0].engine.busy_seconds == 0.0
    backlog = RouterConfig(local_prefill_above_queued_tokens=150)
    many = [RequestShape(0.0, 100, 2, seed=i) for i in range(3)]
    sim = run(ClusterShape(p, p, 1, 1, backlog), many)
    assert [o.placement for o in sim.outcomes] == ["remote", "remote", "prefill_backlog"]


def test_long_prompts_are_chunked_and_decoding_shares_steps():
    p = profile(max_num_batched_tokens=64)
    sim = run(ClusterShape(None, p, 0, 1), [RequestShape(0.0, 10, 40, seed=1), RequestShape(0.05, 200, 2, seed=2)])
    long = sim.outcomes[1]
    # 200 tokens at 63 a step (the decoding request takes one token of each step's 64): three
    # full steps, then 11 tokens, after at most the one decode step already under way.
    chunks = 3 * (BASE + 64 * PER_TOKEN) + BASE + 12 * PER_TOKEN
    assert chunks - 1e-9 <= long.ttft <= chunks + BASE + PER_TOKEN
    gaps = sim.outcomes[0].gaps
    assert max(gaps) == pytest.approx(BASE + 64 * PER_TOKEN)  # a decode step carrying a full chunk


def test_a_request_no_replica_can_hold_is_refused_and_counts_against_attainment():
    # 20 blocks of KV: a 400-token prompt never fits, as vLLM's router refuses it (its answer
    # would otherwise wait forever); a prompt plus answer over max_model_len is refused too.
    small = profile(kv_capacity_tokens=320, max_model_len=320)
    requests = [RequestShape(0.0, 100, 2, seed=1), RequestShape(0.1, 400, 2, seed=2), RequestShape(0.2, 300, 40, seed=3)]
    for shape in (ClusterShape(small, small, 1, 1), ClusterShape(profile(), small, 1, 1), ClusterShape(None, small, 0, 1)):
        report = simulate(shape, requests, slo_ttft_ms=1000, slo_itl_ms=100)
        assert report["placements"]["rejected"] == 2
        assert report["completed"] == 1
        assert report["slo_attainment"] == pytest.approx(1 / 3, abs=1e-3)


# A host KV tier on the hand profile: 4 engine blocks of 16 tokens; a block is 16 000 bytes,
# copied in or out of the tier in 1.6 ms at 0.01 GB/s.
TIER_PROFILE = dict(kv_capacity_tokens=64, tier_gbps=0.01)
COPY = 0.0016


def tier_gib(blocks: float) -> float:
    return (blocks + 0.5) * 16 * 1000 / (1 << 30)


def three_block_prompt(at: float, name: int) -> RequestShape:
    """48 tokens, three full blocks of its own (the prompt and its first token fill the 4 blocks)."""
    return RequestShape(at, 48, 2, prefix_blocks=(name,), block_tokens=48, seed=name)


def test_a_host_tier_keeps_what_the_cache_evicts_and_loads_it_back():
    p = profile(**TIER_PROFILE)
    # A, then B (whose blocks evict A's first two from the 4-block cache), then A again.
    requests = [three_block_prompt(0.0, 1), three_block_prompt(10.0, 2), three_block_prompt(20.0, 1)]
    without = run(ClusterShape(None, p, 0, 1), requests)
    assert [o.ttft for o in without.outcomes] == pytest.approx([BASE + 48 * PER_TOKEN] * 3)  # A is computed again
    with_tier = run(ClusterShape(None, p, 0, 1, tier_gib=tier_gib(8)), requests)
    first, _, again = with_tier.outcomes
    assert first.ttft == pytest.approx(BASE + 48 * PER_TOKEN + 3 * COPY)  # its three blocks stored into the tier
    # Two blocks load (the tier leaves the prompt's last token to compute): 16 tokens computed.
    assert again.ttft == pytest.approx(BASE + 16 * PER_TOKEN + 2 * COPY)
    engine = with_tier.decodes[0].engine
    assert engine.prompt_tokens == {"engine_cache": 0, "tier": 32, "peer": 0, "computed": 3 * 48 - 32}
    report = simulate(ClusterShape(None, p, 0, 1, tier_gib=tier_gib(8)), requests, slo_ttft_ms=1000, slo_itl_ms=100)
    assert report["prompt_tokens"] == engine.prompt_tokens and report["prefix_hit_rate"] == pytest.approx(32 / 144, abs=1e-4)
    # A tier smaller than what came between (3 blocks: B's pushed A's out) keeps nothing of A.
    small = run(ClusterShape(None, p, 0, 1, tier_gib=tier_gib(3)), requests)
    assert small.decodes[0].engine.prompt_tokens["tier"] == 0


def test_the_router_sees_each_prefill_replicas_tier_and_sends_a_prefix_to_it():
    p = profile(**TIER_PROFILE)
    router = RouterConfig(bypass_prefill_below_tokens=0)
    # A, C, E land on prefill-0 and B, D on prefill-1 (each to the one picked least recently):
    # by then prefill-0's cache has evicted A, and, without a tier, the least recently picked,
    # prefill-1, would take A's repeat.
    requests = [three_block_prompt(10.0 * (i + 1), name) for i, name in enumerate((1, 2, 3, 4, 5, 1))]
    shape = ClusterShape(p, p, 2, 1, router, tier_gib=tier_gib(12))
    before = run(shape, requests[:-1])
    a = requests[0].block_hashes(16)
    assert before.index.overlap_blocks("prefill-0", a) == 0  # the engine's eviction reached the router
    assert before.index.held_blocks("prefill-0", a) == 3  # as the tier's blocks did
    sim = run(shape, requests)
    assert sim.prefills[0].engine.prompt_tokens["tier"] == 32 and sim.prefills[1].engine.prompt_tokens["tier"] == 0
    plain = run(ClusterShape(p, p, 2, 1, router), requests)
    assert plain.prefills[1].engine.prompt_tokens["computed"] == 3 * 48  # B, D and A again


def test_a_tier_needs_a_profile_that_measured_it():
    with pytest.raises(ValueError, match="no host KV tier rate"):
        ClusterShape(None, profile(), 0, 1, tier_gib=1.0)
