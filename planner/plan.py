"""`pdcluster plan`: how many prefill and decode replicas, at which tensor-parallel sizes,
serve a trace within SLOs for the least money.

DistServe's placement search, on the simulator: first each phase alone (one prefill
replica with ample decode behind it, one decode replica with ample prefill in front) gives
each TP size's per-replica goodput; replica counts follow from those for every split of the
GPU budget; the most promising configurations, and co-located engines on the same GPUs, are
then simulated whole. Goodput is DistServe's: the highest request rate at which at least
90% of requests meet both SLOs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pdcluster.common.engine_profile import EngineProfile
from pdcluster.planner.simulator import ClusterShape, simulate
from pdcluster.planner.workloads import RequestShape
from pdcluster.router.config import RouterConfig

ATTAINMENT = 0.9
AMPLE = 8  # replicas of the other phase when measuring one phase alone
TOLERANCE = 0.1
VERIFY_TOP = 4


@dataclass
class Candidate:
    prefill_tp: int
    decode_tp: int
    prefill_replicas: int  # 0: co-located engines
    decode_replicas: int
    gpus: int
    prefill_replica_cost: float  # USD per hour of one replica
    decode_replica_cost: float
    goodput_rate: float = 0.0  # req/s
    estimated: bool = True  # False once simulated whole

    @property
    def cost_per_hour(self) -> float:
        return self.prefill_replicas * self.prefill_replica_cost + self.decode_replicas * self.decode_replica_cost

    @property
    def requests_per_dollar(self) -> float:
        return self.goodput_rate * 3600 / self.cost_per_hour if self.cost_per_hour else float("inf")

    @property
    def colocated(self) -> bool:
        return self.prefill_replicas == 0

    def describe(self) -> str:
        if self.colocated:
            return f"co-located {self.decode_replicas} x TP{self.decode_tp}"
        return f"{self.prefill_replicas}P x TP{self.prefill_tp} + {self.decode_replicas}D x TP{self.decode_tp}"


def retimed(requests: list[RequestShape], rate: float) -> list[RequestShape]:
    """The same requests in the same order and spacing pattern, arriving at `rate` req/s."""
    span = requests[-1].arrival_s - requests[0].arrival_s
    native = (len(requests) - 1) / span if span > 0 else rate
    factor = native / rate
    return [replace(r, arrival_s=(r.arrival_s - requests[0].arrival_s) * factor) for r in requests]


def goodput_rate(shape: ClusterShape, requests: list[RequestShape], slo_ttft_ms: float, slo_itl_ms: float, start: float) -> float:
    """The highest rate (req/s) with >= 90% of requests within both SLOs, to within 10%:
    doubling (or halving) from `start`, then bisecting."""

    def meets(rate: float) -> bool:
        return simulate(shape, retimed(requests, rate), slo_ttft_ms, slo_itl_ms)["slo_attainment"] >= ATTAINMENT

    low, high = start, start
    if meets(start):
        while meets(high := high * 2):
            low = high
            if high > start * 1e3:
                return low
    else:
        while not meets(low := low / 2):
            high = low
            if low < start * 1e-3:
                return 0.0
    while high / low > 1 + TOLERANCE:
        mid = (low * high) ** 0.5
        low, high = (mid, high) if meets(mid) else (low, mid)
    return low


def _units(profile: EngineProfile) -> int:
    return max(1, profile.gpus_per_replica)  # a CPU replica counts as one unit


def plan(
    profiles: dict[int, EngineProfile],
    requests: list[RequestShape],
    slo_ttft_ms: float,
    slo_itl_ms: float,
    max_gpus: int,
    cost: dict[str, float],
    router: RouterConfig = RouterConfig(),
    progress=print,
) -> list[Candidate]:
    """Candidates best first by goodput per dollar (those simulated whole first); `cost` maps
    prefill/decode to USD per GPU-hour (missing: each profile's own price; co-located engines
    are priced as decode GPUs)."""

    def shaped(p_tp: int, d_tp: int, n_p: int, n_d: int) -> ClusterShape:
        def priced(role: str, p: EngineProfile) -> EngineProfile:
            return p.model_copy(update={"cost_per_hour": cost[role] * _units(p)}) if role in cost else p

        prefill = priced("prefill", profiles[p_tp]) if n_p else None
        return ClusterShape(prefill, priced("decode", profiles[d_tp]), n_p, n_d, router)

    mean_prompt = sum(r.input_tokens for r in requests) // len(requests)
    first = {tp: 1.0 / max(1e-3, p.prefill_seconds(mean_prompt)) for tp, p in profiles.items()}
    phases: dict[str, dict[tuple[int, int], float]] = {"prefill": {}, "decode": {}, "co-located": {}}  # (tp, replicas) -> goodput rate
    for tp, profile in sorted(profiles.items()):
        guess = {kind: first[tp] for kind in phases}
        for n in range(1, max_gpus // _units(profile) + 1):
            # Each phase alone: the other one ample, so only this one limits.
            for kind, shape in (
                ("prefill", shaped(tp, tp, n, AMPLE)),
                ("decode", shaped(tp, tp, AMPLE, n)),
                ("co-located", shaped(tp, tp, 0, n)),
            ):
                phases[kind][tp, n] = rate = goodput_rate(shape, requests, slo_ttft_ms, slo_itl_ms, guess[kind])
                guess[kind] = max(rate, guess[kind] / 2) * (n + 1) / n
            progress(
                f"  {n} x TP{tp}: {phases['prefill'][tp, n]:.2f} req/s of prefill, {phases['decode'][tp, n]:.2f} of decode, "
                f"{phases['co-located'][tp, n]:.2f} co-located (>= {ATTAINMENT:.0%} within SLOs)"
            )
    candidates = []
    for (p_tp, n_p), prefill_rate in phases["prefill"].items():
        for (d_tp, n_d), decode_rate in phases["decode"].items():
            gpus = n_p * _units(profiles[p_tp]) + n_d * _units(profiles[d_tp])
            if gpus <= max_gpus:
                shape = shaped(p_tp, d_tp, n_p, n_d)
                rate = min(prefill_rate, decode_rate)
                candidates.append(Candidate(p_tp, d_tp, n_p, n_d, gpus, shape.prefill.cost_per_hour, shape.decode.cost_per_hour, rate))
    for (tp, n), rate in phases["co-located"].items():
        shape = shaped(tp, tp, 0, n)
        gpus = n * _units(profiles[tp])
        candidates.append(Candidate(tp, tp, 0, n, gpus, 0.0, shape.decode.cost_per_hour, rate, estimated=False))

    def by_value(c: Candidate):
        return (c.requests_per_dollar, c.goodput_rate)

    # A configuration whose slower phase meets the SLOs at no rate is not worth simulating whole.
    for c in sorted((c for c in candidates if not c.colocated and c.goodput_rate > 0), key=by_value, reverse=True)[:VERIFY_TOP]:
        shape = shaped(c.prefill_tp, c.decode_tp, c.prefill_replicas, c.decode_replicas)
        c.goodput_rate = goodput_rate(shape, requests, slo_ttft_ms, slo_itl_ms, c.goodput_rate or first[c.prefill_tp])
        c.estimated = False
        progress(f"  simulated whole: {c.describe()}: {c.goodput_rate:.2f} req/s within SLOs")
    return sorted(candidates, key=lambda c: (not c.estimated, *by_value(c)), reverse=True)
