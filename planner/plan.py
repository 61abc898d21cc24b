"""`pdcluster plan`: the cluster's shape for a workload: co-located replicas, or how many
prefill and decode replicas of which size (tensor-parallel size on GPUs, cores on a CPU),
serving it within SLOs for the least money.

DistServe's placement search, on the simulator: first each phase alone (one prefill
replica with ample decode behind it, one decode replica with ample prefill in front) gives
each size's per-replica goodput; replica counts follow from those for every split of the
budget; the most promising splits, and co-located engines on the same budget, are then
simulated whole. Goodput is DistServe's: the highest request rate at which at least 90% of
requests meet both SLOs. A split is chosen only where it beats co-located by a margin: it
pays a serving path (the handoff, the KV transfer) the simulator models only roughly.

Given host KV tier sizes (`--kv-offloading-size`, GiB per replica), the shapes are searched
with the largest under every replica, then the chosen shape's tier is sized: the smallest
whose goodput is within the search's resolution of the best size's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pdcluster.common.engine_profile import EngineProfile
from pdcluster.planner.simulator import ClusterShape, simulate
from pdcluster.planner.workloads import RequestShape
from pdcluster.router.config import RouterConfig

ATTAINMENT = 0.9
AMPLE = 8  # replicas of the other phase when measuring one phase alone
TOLERANCE = 0.1
VERIFY_TOP = 4
# A split's simulated goodput must beat co-located's by this factor to be chosen: the
# simulator's latency errors on this machine reach tens of percent (bench/RESULTS.md), and a
# wrong split loses to co-located at every rate while a wrong co-located choice only forgoes a gain.
SPLIT_MARGIN = 1.25
# A workload's requests to plan on: a burst of a few dozen fits one batch at any rate, so
# fewer would show goodput without bound.
PLAN_REQUESTS = 200


def size_label(size: int, unit: str) -> str:
    return f"TP{size}" if unit == "GPU" else f"{size} core" + "s" * (size > 1)


@dataclass
class Candidate:
    prefill_size: int  # a replica's size: its TP size on GPUs, its cores on a CPU
    decode_size: int
    prefill_replicas: int  # 0: co-located engines
    decode_replicas: int
    units: int  # GPUs, or cores on a CPU, of the whole configuration
    unit: str  # "GPU" or "core"
    prefill_replica_cost: float  # USD per hour of one replica
    decode_replica_cost: float
    goodput_rate: float = 0.0  # req/s
    estimated: bool = True  # False once simulated whole
    tier_gib: float = 0.0  # the host KV tier under every replica, GiB

    @property
    def cost_per_hour(self) -> float:
        return self.prefill_replicas * self.prefill_replica_cost + self.decode_replicas * self.decode_replica_cost

    @property
    def requests_per_dollar(self) -> float:
        return self.goodput_rate * 3600 / self.cost_per_hour if self.cost_per_hour else float("inf")

    @property
    def colocated(self) -> bool:
        return self.prefill_replicas == 0

    def size_label(self, size: int) -> str:
        return size_label(size, self.unit)

    def describe(self) -> str:
        if self.colocated:
            return f"co-located {self.decode_replicas} x {self.size_label(self.decode_size)}"
        prefill, decode = self.size_label(self.prefill_size), self.size_label(self.decode_size)
        return f"{self.prefill_replicas}P x {prefill} + {self.decode_replicas}D x {decode}"

    def describe_tier(self) -> str:
        return f", a {self.tier_gib:g} GiB host KV tier under each replica" if self.tier_gib else ""

    def value(self, priced: bool) -> float:
        """What the plan maximizes: goodput per dollar, or goodput where nothing has a price."""
        return self.requests_per_dollar if priced else self.goodput_rate


@dataclass
class TierSize:
    """The chosen shape with a host KV tier of `gib` under every replica."""

    gib: float
    goodput_rate: float  # req/s
    prefix_hit_rate: float  # prompt tokens not computed (engine cache and tier), at that rate


@dataclass
class Plan:
    candidates: list[Candidate]  # best first by goodput per dollar (those simulated whole first)
    chosen: Candidate  # the shape to serve
    reason: str  # why, in words
    tier_sizes: list[TierSize] = field(default_factory=list)  # the chosen shape at each tier size given


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


def plan(
    profiles: dict[int, EngineProfile],
    requests: list[RequestShape],
    slo_ttft_ms: float,
    slo_itl_ms: float,
    budget: int,
    cost: dict[str, float],
    router: RouterConfig = RouterConfig(),
    progress=print,
    tier_sizes: tuple[float, ...] = (),
) -> Plan:
    """`profiles` maps each replica size to its profile; `budget` is in GPUs (cores on a CPU);
    `cost` maps prefill/decode to USD per GPU-hour (missing: each profile's own price;
    co-located engines are priced as decode GPUs); `tier_sizes`: host KV tier sizes (GiB per
    replica) to choose from."""
    unit = "GPU" if any(p.gpus_per_replica for p in profiles.values()) else "core"
    tier_gib = max(tier_sizes, default=0.0)

    def shaped(p_size: int, d_size: int, n_p: int, n_d: int, tier: float | None = None) -> ClusterShape:
        def priced(role: str, p: EngineProfile) -> EngineProfile:
            return p.model_copy(update={"cost_per_hour": cost[role] * p.replica_units}) if role in cost else p

        prefill = priced("prefill", profiles[p_size]) if n_p else None
        return ClusterShape(prefill, priced("decode", profiles[d_size]), n_p, n_d, router, tier_gib=tier_gib if tier is None else tier)

    def candidate(p_size: int, d_size: int, n_p: int, n_d: int, rate: float, estimated: bool) -> Candidate:
        shape = shaped(p_size, d_size, n_p, n_d)
        units = n_p * profiles[p_size].replica_units + n_d * profiles[d_size].replica_units
        prefill_cost = shape.prefill.cost_per_hour if shape.prefill else 0.0
        return Candidate(p_size, d_size, n_p, n_d, units, unit, prefill_cost, shape.decode.cost_per_hour, rate, estimated, tier_gib)

    mean_prompt = sum(r.input_tokens for r in requests) // len(requests)
    first = {size: 1.0 / max(1e-3, p.prefill_seconds(mean_prompt)) for size, p in profiles.items()}
    phases: dict[str, dict[tuple[int, int], float]] = {"prefill": {}, "decode": {}, "co-located": {}}  # (size, replicas) -> goodput rate
    for size, profile in sorted(profiles.items()):
        guess = {kind: first[size] for kind in phases}
        for n in range(1, budget // profile.replica_units + 1):
            # Each phase alone: the other one ample, so only this one limits.
            for kind, shape in (
                ("prefill", shaped(size, size, n, AMPLE)),
                ("decode", shaped(size, size, AMPLE, n)),
                ("co-located", shaped(size, size, 0, n)),
            ):
                phases[kind][size, n] = rate = goodput_rate(shape, requests, slo_ttft_ms, slo_itl_ms, guess[kind])
                guess[kind] = max(rate, guess[kind] / 2) * (n + 1) / n
            progress(
                f"  {n} x {size_label(size, unit)}: {phases['prefill'][size, n]:.2f} req/s of prefill, {phases['decode'][size, n]:.2f} of decode, "
                f"{phases['co-located'][size, n]:.2f} co-located (>= {ATTAINMENT:.0%} within SLOs)"
            )
    candidates = [
        candidate(p_size, d_size, n_p, n_d, min(prefill_rate, decode_rate), True)
        for (p_size, n_p), prefill_rate in phases["prefill"].items()
        for (d_size, n_d), decode_rate in phases["decode"].items()
        if n_p * profiles[p_size].replica_units + n_d * profiles[d_size].replica_units <= budget
    ]
    candidates += [candidate(size, size, 0, n, rate, False) for (size, n), rate in phases["co-located"].items()]
    priced = any(c.cost_per_hour for c in candidates)

    def by_value(c: Candidate):
        return (c.requests_per_dollar, c.goodput_rate)

    # A configuration whose slower phase meets the SLOs at no rate is not worth simulating whole.
    for c in sorted((c for c in candidates if not c.colocated and c.goodput_rate > 0), key=by_value, reverse=True)[:VERIFY_TOP]:
        shape = shaped(c.prefill_size, c.decode_size, c.prefill_replicas, c.decode_replicas)
        c.goodput_rate = goodput_rate(shape, requests, slo_ttft_ms, slo_itl_ms, c.goodput_rate or first[c.prefill_size])
        c.estimated = False
        progress(f"  simulated whole: {c.describe()}: {c.goodput_rate:.2f} req/s within SLOs")
    candidates.sort(key=lambda c: (not c.estimated, *by_value(c)), reverse=True)
    chosen, other = choose(candidates, priced)

    def outcome(c: Candidate, rate: float, tier: float | None = None) -> dict:
        shape = shaped(c.prefill_size, c.decode_size, c.prefill_replicas, c.decode_replicas, tier)
        return simulate(shape, retimed(requests, rate), slo_ttft_ms, slo_itl_ms)

    reason = shape_reason(chosen, other, priced, mean_prompt, outcome, slo_ttft_ms, slo_itl_ms)
    if not tier_sizes:
        return Plan(candidates, chosen, reason)
    sizes = []
    for gib in sorted(set(tier_sizes)):
        shape = shaped(chosen.prefill_size, chosen.decode_size, chosen.prefill_replicas, chosen.decode_replicas, gib)
        rate = goodput_rate(shape, requests, slo_ttft_ms, slo_itl_ms, chosen.goodput_rate or first[chosen.decode_size])
        hit_rate = outcome(chosen, rate or chosen.goodput_rate or 1.0, gib)["prefix_hit_rate"]
        sizes.append(TierSize(gib, rate, hit_rate))
        progress(
            f"  {chosen.describe()} with {gib:g} GiB tiers: {rate:.2f} req/s within SLOs, {hit_rate:.0%} of prompt tokens not computed"
        )
    best = max(s.goodput_rate for s in sizes)
    tier = next(s for s in sizes if s.goodput_rate * (1 + TOLERANCE) >= best)  # the smallest within the search's resolution
    chosen.tier_gib, chosen.goodput_rate = tier.gib, tier.goodput_rate
    return Plan(candidates, chosen, f"{reason.rstrip('.')}. {tier_reason(tier, sizes)}", sizes)


def tier_reason(chosen: TierSize, sizes: list[TierSize]) -> str:
    """Why this host KV tier size, in words."""
    figures = f"shapes compared with {max(s.gib for s in sizes):g} GiB; " + "; ".join(
        f"{s.gib:g} GiB: {s.goodput_rate:.2f} req/s, {s.prefix_hit_rate:.0%} of prompt tokens not computed" for s in sizes
    )
    if not chosen.gib:
        return f"No host KV tier: a larger one adds less than {TOLERANCE:.0%} to goodput ({figures})."
    if chosen.gib < max(s.gib for s in sizes):
        return f"Host KV tier: {chosen.gib:g} GiB per replica, the smallest within {TOLERANCE:.0%} of the best goodput ({figures})."
    return f"Host KV tier: {chosen.gib:g} GiB per replica: each smaller one loses more than {TOLERANCE:.0%} of goodput ({figures})."


def choose(candidates: list[Candidate], priced: bool) -> tuple[Candidate, Candidate | None]:
    """The shape to serve, and the best of the other kind (co-located or split) to explain it by."""
    # Of co-located shapes within the search's resolution of the best, the fewest, largest
    # replicas: no balancing between them to get wrong. Where nothing serves, the engines on
    # the whole budget lose least.
    colocated = [c for c in candidates if c.colocated]
    best = max(c.value(priced) for c in colocated)
    safest = min(
        (c for c in colocated if c.value(priced) * (1 + TOLERANCE) >= best),
        key=lambda c: (c.decode_replicas, -c.units) if best else -c.units,
    )
    split = next((c for c in candidates if not c.colocated), None)
    if split is None or split.value(priced) <= safest.value(priced) * SPLIT_MARGIN:
        return safest, split
    return split, safest


def _slo_misses(report: dict, slo_ttft_ms: float, slo_itl_ms: float) -> list[str]:
    """Which SLOs a simulated run misses at its 90th percentile, as "p90 TTFT 1450 ms > 1000 ms"."""
    checks = (("TTFT", report["ttft_ms"]["p90"], slo_ttft_ms), ("TPOT", report["tpot_ms"]["p90"], slo_itl_ms))
    return [f"p90 {name} {value:.0f} ms > {slo:g} ms" for name, value, slo in checks if value is not None and value > slo]


def _cause(c: Candidate, slo: str) -> str:
    """The mechanism behind a shape missing one SLO."""
    if c.colocated:
        return "decoding waits behind prompts computed in the same steps" if slo == "TPOT" else "prompts queue for the shared engines"
    if slo == "TTFT":
        return (
            f"its prefill pool ({c.prefill_replicas} x {c.size_label(c.prefill_size)}) computes the prompts and hands them over too slowly"
        )
    return f"its decode pool ({c.decode_replicas} x {c.size_label(c.decode_size)}) is too small for this many streams"


def shape_reason(
    chosen: Candidate, other: Candidate | None, priced: bool, mean_prompt: int, outcome, slo_ttft_ms: float, slo_itl_ms: float
) -> str:
    """Why `chosen` rather than `other` (the best of the other kind), in words; `outcome(c, rate)`
    simulates a candidate at a rate."""
    measure = "req per $" if priced else "req/s within the SLOs"

    def figure(c: Candidate) -> str:
        return f"{c.requests_per_dollar:.0f} req per $" if priced else f"{c.goodput_rate:.2f} req/s within the SLOs"

    if chosen.goodput_rate == 0:
        return (
            f"no shape serves {ATTAINMENT:.0%} of these requests (mean prompt {mean_prompt} tokens) within the SLOs at any rate; "
            f"{chosen.describe()} is the default: a split would add the KV handoff to every miss"
        )
    if other is None:
        return f"{chosen.describe()}: {figure(chosen)}; the budget leaves no room for a prefill and a decode pool"
    # What the loser would do at the winner's goodput rate, and why.
    misses = _slo_misses(outcome(other, chosen.goodput_rate), slo_ttft_ms, slo_itl_ms)
    why = "; ".join(f"{m}: {_cause(other, m.split()[1])}" for m in misses)
    at_rate = f" At {chosen.goodput_rate:.2f} req/s {other.describe()} would miss them ({why})." if why else ""
    if chosen.colocated:
        gain = other.value(priced) / chosen.value(priced) if chosen.value(priced) else float("inf")
        margin = (
            f"; a split must beat co-located by {SPLIT_MARGIN:g}x in {measure} to pay for its serving path and the simulator's error"
            if gain > 1
            else ""
        )
        return f"{chosen.describe()}: {figure(chosen)}, against {figure(other)} for the best split, {other.describe()}{margin}.{at_rate}"
    return (
        f"{chosen.describe()}: {figure(chosen)}, {chosen.value(priced) / max(1e-9, other.value(priced)):.2f}x {other.describe()}'s "
        f"{figure(other)} (a split is chosen above {SPLIT_MARGIN:g}x).{at_rate}"
    )
