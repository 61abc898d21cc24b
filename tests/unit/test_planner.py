"""Profiles (reference ones from the roofline, fitted ones from samples), trace loading and
scaling, the plan's search, and the controller's cost-per-token meter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdcluster.cluster.cluster_spec import ClusterSpec
from pdcluster.cluster.pool_cost import PoolCostMeter
from pdcluster.common.engine_profile import ServingPath, StepCost, load_profile
from pdcluster.common.worker_record import Role
from pdcluster.planner.plan import SPLIT_MARGIN, plan, retimed
from pdcluster.planner.plan_spec import plan_spec
from pdcluster.planner.profile_files import REFERENCE_DIR, profile_for_tp, tp_sizes
from pdcluster.planner.profiler import fit_step_cost
from pdcluster.planner.roofline import reference_profiles
from pdcluster.planner.serving_path import OUTPUT_TOKENS, predicted_alone
from pdcluster.planner.simulator import ClusterShape, ClusterSimulation
from pdcluster.planner.workloads import COMPARE_WORKLOADS, AgenticSessions, RequestShape, TraceScaling, load_trace
from pdcluster.protos import worker_pb2
from pdcluster.router.config import RouterConfig

from tests.support.hand_profile import profile as hand_profile
from tests.support.paths import TRACES

BENCH_PROFILES = Path(__file__).parents[2] / "bench" / "profiles"


def test_shipped_reference_profiles_are_the_rooflines_and_name_their_sources():
    expected = reference_profiles()
    shipped = {p.stem: load_profile(p) for p in REFERENCE_DIR.glob("*.json")}
    assert shipped == expected  # regenerate with `python -m pdcluster.planner.roofline`
    for gpu in ("h100", "h200"):
        assert tp_sizes(REFERENCE_DIR / f"{gpu}-llama-3-8b-tp1.json") == [1, 2, 4, 8]
        assert tp_sizes(REFERENCE_DIR / f"{gpu}-llama-3-70b-tp2.json") == [2, 4, 8]  # 141 GB of weights need 2 GPUs
    for p in shipped.values():
        assert p.estimate and p.gpus_per_replica == p.tensor_parallel_size
        assert {"hardware", "model", "step.base_s", "step.per_token_s", "transfer_gbps", "cost_per_hour"} <= set(p.sources)
    small = shipped["h100-llama-3-8b-tp1"]
    assert small.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2
    # Decoding one request: the 16 GB of weights at 80% of 3.35 TB/s, plus the step overhead.
    assert small.step.seconds(1, 0, 0) == pytest.approx(0.0015 + 16.06e9 / (3.35e12 * 0.8), rel=0.01)
    assert shipped["h200-llama-3-8b-tp1"].step.base_s < small.step.base_s  # more bandwidth
    assert profile_for_tp(REFERENCE_DIR / "h100-llama-3-8b-tp1.json", 4).tensor_parallel_size == 4
    with pytest.raises(ValueError, match="TP 1"):
        profile_for_tp(REFERENCE_DIR / "h100-llama-3-70b-tp2.json", 1)


def test_step_cost_fit_recovers_known_coefficients():
    truth = StepCost(base_s=0.004, per_token_s=2e-5, per_prefill_pair_s=3e-9, per_decode_context_token_s=5e-8)
    rows = [(n, n * n / 2, 0) for n in (16, 128, 512, 2048)] + [(b, 0.0, b * c) for b in (1, 8, 32) for c in (128, 1024)]
    fitted = fit_step_cost(rows, [truth.seconds(*r) for r in rows])
    for name, value in truth.model_dump().items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("remote", [True, False])
def test_the_simulator_adds_the_measured_serving_path(remote):
    """A request alone on an idle 1P+1D: the step model's TTFT and gaps, plus the profile's
    serving path (what `pdcluster profile` measured beyond them), each once."""
    bare = load_profile(REFERENCE_DIR / "h100-llama-3-8b-tp1.json")
    path = ServingPath(request_s=0.004, remote_request_s=0.025, token_s=0.0005)
    served = bare.model_copy(update={"serving_path": path})
    ttft, gap = predicted_alone(served, 1000, remote)  # the profile's own path left out
    shape = ClusterShape(served, served, 1, 1, RouterConfig(bypass_prefill_below_tokens=1 if remote else 1_000_000))
    (outcome,) = ClusterSimulation(shape).run([RequestShape(0.0, 1000, OUTPUT_TOKENS)])
    assert outcome.placement == ("remote" if remote else "short_prompt")
    assert outcome.ttft == pytest.approx(ttft + path.first_token_s(remote))
    assert len(outcome.gaps) == OUTPUT_TOKENS - 1 and min(outcome.gaps) == pytest.approx(gap + path.token_s, rel=0.05)
    assert outcome.tpot == pytest.approx(sum(outcome.gaps) / len(outcome.gaps))


def test_engines_on_shared_cores_slow_each_other():
    """Two prompts at once on two co-located replicas: on separate hardware each takes what it
    takes alone; on one machine's shared cores, the one that starts while the other computes
    takes twice as long."""
    profile = load_profile(REFERENCE_DIR / "h100-llama-3-8b-tp1.json")
    both = [RequestShape(0.0, 2000, 2), RequestShape(0.0, 2000, 2)]

    def ttfts(shared: bool) -> list[float]:
        shape = ClusterShape(None, profile, 0, 2, RouterConfig(), shared_cores=shared)
        return sorted(o.ttft for o in ClusterSimulation(shape).run(both))

    alone = ttfts(False)
    assert alone[0] == pytest.approx(alone[1])
    shared = ttfts(True)
    assert shared[0] == pytest.approx(alone[0]) and shared[1] == pytest.approx(2 * alone[1])


def test_traces_load_scaled_with_their_shared_prefixes():
    mooncake = load_trace(str(TRACES / "mooncake_conversation_head.jsonl"), "mooncake", TraceScaling(0.5, 0.1, 10, 4096))
    raw = [json.loads(line) for line in (TRACES / "mooncake_conversation_head.jsonl").read_text().splitlines()[:10]]
    assert len(mooncake) == 10 and mooncake[0].block_tokens == 256
    for r, row in zip(mooncake, raw, strict=True):
        assert r.arrival_s == pytest.approx(row["timestamp"] / 1e3 * 0.1)
        assert r.output_tokens == min(round(row["output_length"] * 0.5), 2048)
        assert r.input_tokens == min(round(row["input_length"] * 0.5), 4096 - r.output_tokens - 1)
        assert r.prefix_blocks == tuple(row["hash_ids"])
    # Equal first hash ids: equal first blocks, as ids and as tokens.
    a, b = mooncake[0], mooncake[1]
    assert a.block_hashes(16)[:16] == b.block_hashes(16)[:16] and a.block_hashes(16)[16] != b.block_hashes(16)[16]
    assert a.prompt_tokens(977)[:256] == b.prompt_tokens(977)[:256] and len(a.prompt_tokens(977)) == a.input_tokens
    azure = load_trace(str(TRACES / "azure_2023_code_head.csv"), "azure", TraceScaling(max_requests=5))
    assert [r.input_tokens for r in azure] == [4808, 3180, 110, 7433, 34]
    later = load_trace(str(TRACES / "azure_2023_code_head.csv"), "azure", TraceScaling(max_requests=2, first_request=3))
    assert [r.input_tokens for r in later] == [7433, 34] and later[0].arrival_s == 0.0
    assert azure[1].arrival_s == pytest.approx(0.052, abs=1e-3) and not azure[0].prefix_blocks
    with pytest.raises(ValueError, match="trace-format"):
        load_trace(str(TRACES / "azure_2023_code_head.csv"), "sharegpt")
    faster = retimed(azure, 2.0)  # 5 requests at 2 req/s: the last at 2 s, same spacing pattern
    assert faster[-1].arrival_s == pytest.approx(2.0)
    assert [r.arrival_s for r in faster] == pytest.approx([r.arrival_s * 2.0 / azure[-1].arrival_s for r in azure])


def test_plan_finds_the_cheapest_configuration_and_writes_a_spec():
    path = REFERENCE_DIR / "h100-llama-3-8b-tp1.json"
    profiles = {tp: profile_for_tp(path, tp) for tp in (1, 2)}
    requests = load_trace(str(TRACES / "azure_2023_code_head.csv"), "azure", TraceScaling(max_requests=40))
    lines = []
    result = plan(profiles, requests, slo_ttft_ms=2000, slo_itl_ms=100, budget=3, cost={"prefill": 2.0}, progress=lines.append)
    best = result.candidates[0]
    assert not best.estimated and best.goodput_rate > 0 and best.units <= 3
    simulated = [c for c in result.candidates if not c.estimated]
    assert simulated == sorted(simulated, key=lambda c: c.requests_per_dollar, reverse=True)
    assert {c.colocated for c in simulated} == {True, False}  # both kinds were simulated whole
    assert result.chosen in simulated and result.chosen.describe() in result.reason
    split = next(c for c in result.candidates if not c.colocated)
    assert split.prefill_replica_cost == 2.0 * split.prefill_size  # --cost prefill=2 per GPU-hour
    assert split.decode_replica_cost == profiles[split.decode_size].cost_per_hour  # the profile's own price
    assert any("TP2" in line for line in lines)
    spec = plan_spec(split, profiles)
    assert isinstance(spec, ClusterSpec)
    assert (spec.prefill.replicas, spec.decode.replicas) == (split.prefill_replicas, split.decode_replicas)
    assert spec.prefill.tensor_parallel_size == split.prefill_size and spec.prefill.num_gpus == split.prefill_size
    assert spec.prefill.cost_per_hour == split.prefill_replica_cost and spec.engine.model == profiles[1].model


def test_plan_on_cpu_cores_splits_only_where_co_located_loses_by_the_margin_and_says_why():
    one_core = load_profile(BENCH_PROFILES / "cpu1-bench-llama.json")
    assert (one_core.cpu_cores, one_core.replica_units, one_core.replica_size) == (1, 1, 1)
    prompts = COMPARE_WORKLOADS["prefill-heavy"].shapes(30, 1.0)
    # Long prompts, a tight TPOT SLO: in co-located engines decoding waits behind them.
    split = plan({1: one_core}, prompts, slo_ttft_ms=20_000, slo_itl_ms=60, budget=2, cost={}, progress=lambda _: None)
    colocated = max((c for c in split.candidates if c.colocated), key=lambda c: c.goodput_rate)
    assert split.chosen.describe() == "1P x 1 core + 1D x 1 core" and split.chosen.units == 2
    assert split.chosen.goodput_rate > SPLIT_MARGIN * colocated.goodput_rate
    assert "TPOT" in split.reason and "decoding waits behind prompts" in split.reason and colocated.describe() in split.reason
    # Served: a prefill and a decode pool of one-core workers.
    spec = plan_spec(split.chosen, {1: one_core})
    assert (spec.prefill.replicas, spec.decode.replicas, spec.prefill.num_cpus, spec.decode.num_cpus) == (1, 1, 1.0, 1.0)
    # A loose TPOT SLO: prompts stalling decoding cost nothing, and co-located keeps every core for both.
    relaxed = plan({1: one_core}, prompts, slo_ttft_ms=20_000, slo_itl_ms=10_000, budget=2, cost={}, progress=lambda _: None)
    best_split = next(c for c in relaxed.candidates if not c.colocated)
    assert relaxed.chosen.colocated and relaxed.chosen.goodput_rate * SPLIT_MARGIN >= best_split.goodput_rate
    assert relaxed.chosen.describe() in relaxed.reason and best_split.describe() in relaxed.reason
    # Co-located replicas are a decode pool alone: the router computes every prompt there.
    spec = plan_spec(relaxed.chosen, {1: one_core})
    assert spec.prefill.replicas == 0 and spec.decode.replicas == relaxed.chosen.decode_replicas


def test_plan_takes_a_core_budget_and_profiles_by_size(capsys, tmp_path):
    from pdcluster.cli import main

    spec = tmp_path / "plan.yaml"
    profiles = [str(BENCH_PROFILES / f"cpu{n}-bench-llama.json") for n in (1, 2)]
    argv = ["plan", "--profile", *profiles, "--workload", "prefill-heavy", "--requests", "30", "--cores", "2"]
    assert main([*argv, "--slo-ttft-ms", "20000", "--slo-itl-ms", "10000", "--write-spec", str(spec), "--json"]) == 0
    out = capsys.readouterr().out
    assert "with 1-core, 2-core replicas, up to 2 cores" in out and "co-located 1 x 2 cores" in out and "why: " in out
    chosen = json.loads(out.splitlines()[-1])
    assert chosen["reason"] in spec.read_text() and chosen["chosen"]["units"] <= 2
    assert main(["plan", "--profile", profiles[0], profiles[0], "--workload", "balanced"]) == 2  # two profiles of one size
    assert "two profiles for replicas of size 1" in capsys.readouterr().err


def test_plan_says_when_nothing_meets_the_slos_and_writes_no_spec(tmp_path, capsys):
    from pdcluster.cli import main

    # A 70B TP2 replica holds 14.7k tokens of KV: vLLM caps its context there, so the long
    # Mooncake prompts are refused (counted against the SLOs), not queued forever.
    spec = tmp_path / "plan.yaml"
    argv = ["plan", "--profile", "h100-llama-3-70b-tp2", "--trace", str(TRACES / "mooncake_conversation_head.jsonl")]
    argv += ["--trace-format", "mooncake", "--max-requests", "20", "--max-gpus", "2", "--write-spec", str(spec)]
    assert main(argv) == 1
    out = capsys.readouterr()
    assert "a TP2 replica refuses" in out.out and "longer than its max_model_len 14736" in out.out
    assert "no configuration on up to 2 GPUs serves 90%" in out.out and "no cluster spec written" in out.err
    assert not spec.exists()


def test_plan_sizes_the_host_kv_tier_of_the_chosen_shape():
    # Agent sessions whose turns grow a prompt of 128 tokens by 16: 8 sessions overflow a
    # 512-token engine cache between a session's turns, so only a tier keeps the TTFT SLO
    # (a turn computed whole takes over 150 ms on this hand profile, a reloaded one ~40 ms).
    p = hand_profile(kv_capacity_tokens=512, tier_gbps=0.1, cpu_cores=1)
    sessions = AgenticSessions(8, 6, 128, 16, 4, think_s=2.0, session_gap_s=0.25, block_tokens=16).shapes()
    sizes = (0.0, 0.0005, 0.002, 0.01)  # GiB: 0, 33, 134 and 671 blocks of 16 tokens
    result = plan({1: p}, sessions, slo_ttft_ms=150, slo_itl_ms=100, budget=2, cost={}, progress=lambda _: None, tier_sizes=sizes)
    by_size = {t.gib: t for t in result.tier_sizes}
    assert by_size[0.0].goodput_rate == 0 and by_size[0.0].prefix_hit_rate == 0  # every turn computed whole
    assert by_size[0.01].goodput_rate > 0 and by_size[0.01].prefix_hit_rate > 0.7
    assert by_size[0.0005].goodput_rate == 0  # 33 blocks: the sessions' turns push each other out
    # The smallest within the search's resolution of the best: 0.002 GiB, not the largest offered.
    assert result.chosen.tier_gib == 0.002 and by_size[0.002].goodput_rate * 1.1 >= by_size[0.01].goodput_rate
    assert result.chosen.goodput_rate == by_size[0.002].goodput_rate
    assert "Host KV tier: 0.002 GiB per replica, the smallest within 10% of the best goodput" in result.reason
    assert plan_spec(result.chosen, {1: p}).engine.vllm_args["kv_offloading_size"] == 0.002  # served with vLLM's flag
    # A profile from before tiers cannot size one.
    with pytest.raises(ValueError, match="no host KV tier rate"):
        plan({1: hand_profile(cpu_cores=1)}, sessions[:4], 150, 100, budget=1, cost={}, progress=lambda _: None, tier_sizes=(1.0,))


def test_pool_cost_meter_divides_each_pool_cost_by_the_clusters_tokens():
    meter = PoolCostMeter(window_s=300)
    cost = {Role.PREFILL: 7.2, Role.DECODE: 3.6}  # USD per replica-hour

    def stats(prompt, generated, busy):
        return worker_pb2.WorkerStats(prompt_tokens=prompt, generation_tokens=generated, busy_seconds=busy)

    meter.observe(0.0, [("p1", Role.PREFILL, stats(0, 0, 0)), ("d1", Role.DECODE, stats(0, 0, 0))], cost)
    assert meter.cost_per_million_tokens() == {}
    meter.observe(60.0, [("p1", Role.PREFILL, stats(9000, 9, 30)), ("d1", Role.DECODE, stats(1000, 100, 15))], cost)
    usd = meter.cost_per_million_tokens()
    # One minute: prefill $0.12, decode $0.06; the cluster served 1000 input and 100 output tokens.
    assert usd["prefill", "input"] == pytest.approx(0.12 / 1000 * 1e6)
    assert usd["decode", "output"] == pytest.approx(0.06 / 100 * 1e6)
    assert usd["all", "input"] == pytest.approx(0.18 / 1000 * 1e6)
    assert meter.utilization() == pytest.approx({"prefill": 0.5, "decode": 0.25})
    # A replaced decode worker starts its totals at zero: its tokens still count, nothing goes negative.
    meter.observe(120.0, [("p1", Role.PREFILL, stats(9000, 9, 30)), ("d2", Role.DECODE, stats(500, 50, 6))], cost)
    assert meter.cost_per_million_tokens()["all", "output"] == pytest.approx(0.36 / 150 * 1e6)
