"""The autoscaling policy: each pool's target replica count from its own load signal.

With the `queue` signal, prefill load is queued prefill tokens per replica against a target;
decode load is the larger of KV-block utilization and running requests per replica against
theirs. With the `slo` signal (`SLOLoad`), a replica's load is its latency against the SLO its
pool serves (TTFT for prefill, ITL for decode): the worse of the p90 it observed lately and
what the profile predicts from its queue now (a queue that just formed has not yet shown in
observed latencies; observed ones correct a profile that is off). A pool
grows once its load has stayed above target for `upscale_delay_s`, shrinks by one once it
has stayed below `downscale_ratio` x target for `downscale_delay_s`, and never acts twice
within `cooldown_s`: the gap between the two thresholds is the hysteresis that stops flapping.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from pdcluster.cluster.cluster_spec import AutoscalingSpec, PoolSpec
from pdcluster.common.engine_profile import EngineProfile
from pdcluster.common.slo import SLO
from pdcluster.common.worker_load import decode_context_tokens, kv_cache_usage
from pdcluster.common.worker_record import Role
from pdcluster.protos import worker_pb2


@dataclass
class ScalingDecision:
    at: float
    role: str
    from_replicas: int
    to_replicas: int
    load: float  # relative to target; 1.0 = at target
    reason: str


def pool_load(role: str, stats: list[worker_pb2.WorkerStats], spec: AutoscalingSpec, slo: SLOLoad | None = None) -> float:
    """Mean load of the pool's ready replicas relative to its target (1.0 = on target)."""
    if not stats:
        return 0.0
    if slo is not None:
        return sum(slo.replica_load(role, s) for s in stats) / len(stats)
    if role == Role.PREFILL:
        return sum(s.queued_prefill_tokens for s in stats) / len(stats) / spec.prefill_target_queued_tokens
    kv_usage = sum(kv_cache_usage(s) for s in stats) / len(stats)
    running = sum(s.running + s.queued for s in stats) / len(stats)
    return max(kv_usage / spec.decode_target_kv_usage, running / spec.decode_target_running)


@dataclass
class SLOLoad:
    """Pool load against the SLOs, from the profile's predictions and the replicas' own latencies."""

    profile: EngineProfile
    slo: SLO
    kv_target: float  # a decode pool short of KV blocks is overloaded whatever its ITL

    def replica_load(self, role: str, s: worker_pb2.WorkerStats) -> float:
        if role == Role.PREFILL:
            return max(s.prefill_seconds_p90, self.profile.queued_prompt_seconds(s.queued_prefill_tokens)) / self.slo.ttft_s
        itl = max(s.itl_seconds_p90, self.profile.decode_step_seconds(s.running, decode_context_tokens(s))) / self.slo.itl_s
        return max(itl, kv_cache_usage(s) / self.kv_target)


@dataclass
class _PoolState:
    over_since: float | None = None
    under_since: float | None = None
    last_action: float = -math.inf


@dataclass
class Autoscaler:
    spec: AutoscalingSpec
    _pools: dict[str, _PoolState] = field(default_factory=dict)

    def decide(self, role: str, pool: PoolSpec, target: int, ready: int, load: float, now: float | None = None) -> ScalingDecision | None:
        """A new target for the pool, or None to keep it. While the pool still converges on its
        last target (replicas starting), it holds: load seen before the new capacity serves
        says nothing about that capacity, and a lull then must not cancel a replica half-way
        through its start (as Dynamo's planner skips intervals while a scaling is under way)."""
        now = time.monotonic() if now is None else now
        state = self._pools.setdefault(role, _PoolState())
        if ready < target:
            state.over_since = state.under_since = None
            return None
        if load > 1.0:
            state.under_since = None
            state.over_since = now if state.over_since is None else state.over_since
        elif load < self.spec.downscale_ratio:
            state.over_since = None
            state.under_since = now if state.under_since is None else state.under_since
        else:
            state.over_since = state.under_since = None
        if now - state.last_action < self.spec.cooldown_s:
            return None
        new = target
        if state.over_since is not None and now - state.over_since >= self.spec.upscale_delay_s:
            new = min(pool.max_replicas, max(target + 1, math.ceil(target * load)))
            reason = f"load {load:.2f} x target for {now - state.over_since:.0f}s"
        elif state.under_since is not None and now - state.under_since >= self.spec.downscale_delay_s:
            new = max(pool.min_replicas, target - 1)
            reason = f"load {load:.2f} x target (< {self.spec.downscale_ratio}) for {now - state.under_since:.0f}s"
        if new == target:
            return None
        state.last_action = now
        state.over_since = state.under_since = None
        return ScalingDecision(time.time(), role, target, new, load, reason)
