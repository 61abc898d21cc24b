"""The autoscaling policy on synthetic load over synthetic time."""

from __future__ import annotations

import pydantic
import pytest

from pdcluster.cluster.autoscaler import Autoscaler, SLOLoad, pool_load
from pdcluster.cluster.cluster_spec import AutoscalingSpec, ClusterSpec, PoolSpec
from pdcluster.common.slo import SLO
from pdcluster.protos import worker_pb2

from tests.support.hand_profile import profile

SPEC = AutoscalingSpec(
    enabled=True,
    upscale_delay_s=4,
    downscale_delay_s=30,
    cooldown_s=10,
    downscale_ratio=0.5,
    prefill_target_queued_tokens=1000,
    decode_target_kv_usage=0.8,
    decode_target_running=10,
)
POOL = PoolSpec(replicas=1, min_replicas=1, max_replicas=4)


def test_pool_load_uses_each_pools_own_signal():
    prefill = [worker_pb2.WorkerStats(queued_prefill_tokens=3000), worker_pb2.WorkerStats(queued_prefill_tokens=1000)]
    assert pool_load("prefill", prefill, SPEC) == 2.0
    busy_kv = [worker_pb2.WorkerStats(free_kv_blocks=20, total_kv_blocks=100, running=1)]
    assert abs(pool_load("decode", busy_kv, SPEC) - 1.0) < 1e-9  # 80% of blocks in use, target 0.8
    many_requests = [worker_pb2.WorkerStats(free_kv_blocks=100, total_kv_blocks=100, running=15, queued=5)]
    assert pool_load("decode", many_requests, SPEC) == 2.0
    assert pool_load("decode", [], SPEC) == 0.0


def test_slo_load_is_the_worse_of_observed_and_predicted_latency_against_the_slo():
    # The hand profile: a step is 10 ms + 1 ms per token. SLOs: TTFT 1 s, ITL 50 ms.
    slo = SLOLoad(profile(), SLO(ttft_ms=1000, itl_ms=50), kv_target=0.8)
    queued = worker_pb2.WorkerStats(queued_prefill_tokens=1990)  # two chunks: 20 ms + 1.99 s ahead of a new prompt
    assert pool_load("prefill", [queued], SPEC, slo) == pytest.approx(2.01)
    late = worker_pb2.WorkerStats(prefill_seconds_p90=0.5)  # no queue now, but prompts took 0.5 s lately
    assert pool_load("prefill", [late], SPEC, slo) == pytest.approx(0.5)
    assert pool_load("prefill", [queued, late], SPEC, slo) == pytest.approx(1.255)  # the pool's mean
    # Decode: 30 running requests make a 40 ms step (0.8 x SLO); observed 100 ms between tokens is 2 x.
    running = worker_pb2.WorkerStats(running=30, free_kv_blocks=100, total_kv_blocks=100, block_size=16)
    assert pool_load("decode", [running], SPEC, slo) == pytest.approx(0.8)
    running.itl_seconds_p90 = 0.1
    assert pool_load("decode", [running], SPEC, slo) == pytest.approx(2.0)
    full = worker_pb2.WorkerStats(free_kv_blocks=4, total_kv_blocks=100)  # 96% of KV in use, target 80%
    assert pool_load("decode", [full], SPEC, slo) == pytest.approx(1.2)
    assert pool_load("decode", [worker_pb2.WorkerStats()], SPEC, slo) == 0.0  # idle: nothing late


def test_the_slo_signal_needs_a_profile_to_predict_from():
    with pytest.raises(pydantic.ValidationError, match="router.profile"):
        ClusterSpec.model_validate({"autoscaling": {"signal": "slo"}})
    assert ClusterSpec.model_validate({"autoscaling": {"signal": "slo"}, "router": {"profile": "p.json"}}).autoscaling.signal == "slo"


def test_role_switching_needs_one_engine_for_both_pools():
    with pytest.raises(pydantic.ValidationError, match="same engine arguments"):
        ClusterSpec.model_validate({"autoscaling": {"role_switching": True}, "prefill": {"engine": {"max_num_batched_tokens": 8192}}})
    spec = ClusterSpec.model_validate({"autoscaling": {"role_switching": True}})
    assert spec.worker_config("decode", "d-1").role_switching  # its workers start able to serve either role


def test_scales_up_only_after_sustained_load_and_by_the_overload():
    scaler = Autoscaler(SPEC)
    assert scaler.decide("prefill", POOL, 1, 1, 3.0, now=0) is None
    assert scaler.decide("prefill", POOL, 1, 1, 3.0, now=3) is None  # not yet 4 s
    decision = scaler.decide("prefill", POOL, 1, 1, 3.0, now=4)
    assert (decision.from_replicas, decision.to_replicas) == (1, 3)
    # Capped at max_replicas.
    scaler = Autoscaler(SPEC)
    scaler.decide("prefill", POOL, 3, 3, 9.0, now=0)
    assert scaler.decide("prefill", POOL, 3, 3, 9.0, now=5).to_replicas == 4


def test_a_blip_does_not_scale():
    scaler = Autoscaler(SPEC)
    scaler.decide("decode", POOL, 1, 1, 2.0, now=0)
    scaler.decide("decode", POOL, 1, 1, 0.9, now=2)  # back within target: the clock restarts
    assert scaler.decide("decode", POOL, 1, 1, 2.0, now=4) is None
    assert scaler.decide("decode", POOL, 1, 1, 2.0, now=8) is not None


def test_holds_while_replicas_start_and_counts_load_only_from_then_on():
    scaler = Autoscaler(SPEC)
    scaler.decide("prefill", POOL, 2, 1, 3.0, now=0)
    assert scaler.decide("prefill", POOL, 2, 1, 3.0, now=10) is None  # one replica still starting
    assert scaler.decide("prefill", POOL, 2, 2, 3.0, now=11) is None  # its load is measured from now
    assert scaler.decide("prefill", POOL, 2, 2, 3.0, now=15).to_replicas == 4
    # A lull while a replica starts does not cancel it.
    for t in range(20, 100, 10):
        assert scaler.decide("prefill", POOL, 4, 3, 0.0, now=t) is None
    assert scaler.decide("prefill", POOL, 4, 4, 0.0, now=100) is None
    assert scaler.decide("prefill", POOL, 4, 4, 0.0, now=130).to_replicas == 3


def test_scales_down_one_at_a_time_with_hysteresis_and_cooldown():
    scaler = Autoscaler(SPEC)
    # Between downscale_ratio and 1.0: hold, however long.
    for t in range(0, 100, 10):
        assert scaler.decide("decode", POOL, 3, 3, 0.6, now=t) is None
    assert scaler.decide("decode", POOL, 3, 3, 0.1, now=100) is None
    decision = scaler.decide("decode", POOL, 3, 3, 0.1, now=130)
    assert (decision.from_replicas, decision.to_replicas) == (3, 2)
    assert scaler.decide("decode", POOL, 2, 2, 0.1, now=135) is None  # cooldown, and the clock restarted
    assert scaler.decide("decode", POOL, 2, 2, 0.1, now=165).to_replicas == 1
    assert scaler.decide("decode", POOL, 1, 1, 0.0, now=300) is None  # at min_replicas


def test_pools_are_independent():
    scaler = Autoscaler(SPEC)
    scaler.decide("prefill", POOL, 1, 1, 5.0, now=0)
    scaler.decide("decode", POOL, 1, 1, 0.7, now=0)
    assert scaler.decide("prefill", POOL, 1, 1, 5.0, now=4).to_replicas == 4
    assert scaler.decide("decode", POOL, 1, 1, 0.7, now=4) is None
