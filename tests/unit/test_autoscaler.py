"""The autoscaling policy on synthetic load over synthetic time."""

from __future__ import annotations

from pdcluster.cluster.autoscaler import Autoscaler, pool_load
from pdcluster.cluster.cluster_spec import AutoscalingSpec, PoolSpec
from pdcluster.protos import worker_pb2

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
