"""What each pool costs per million tokens the cluster serves, and how busy it is, over a
sliding window, from the replicas' running totals.

Every request passes through a decode replica, whose engine counts its whole prompt
(computed, cached or loaded) and its output: those are the cluster's input and output
tokens. A pool's cost accrues while its replicas are ready, at its `cost_per_hour` each.
`pdcluster_cost_usd_per_million_tokens{pool, kind}` is a pool's cost in the window over the
cluster's tokens of that kind (pool "all": the whole cluster's); utilization is the share
of the window the pool's engines had requests running.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from pdcluster.common.worker_record import ROLES, Role
from pdcluster.protos import worker_pb2

WINDOW_S = 300.0
KINDS = ("input", "output")


@dataclass
class _Totals:
    """Running sums since the controller started; samples of these make the window."""

    cost: dict[str, float] = field(default_factory=lambda: {r.value: 0.0 for r in ROLES})
    replica_seconds: dict[str, float] = field(default_factory=lambda: {r.value: 0.0 for r in ROLES})
    busy_seconds: dict[str, float] = field(default_factory=lambda: {r.value: 0.0 for r in ROLES})
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def copy(self) -> _Totals:
        return _Totals(dict(self.cost), dict(self.replica_seconds), dict(self.busy_seconds), dict(self.tokens))


class PoolCostMeter:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._totals = _Totals()
        self._samples: collections.deque[tuple[float, _Totals]] = collections.deque()
        self._seen: dict[str, worker_pb2.WorkerStats] = {}  # replica id -> its last stats
        self._last: float | None = None

    def observe(self, now: float, ready: list[tuple[str, Role, worker_pb2.WorkerStats]], cost_per_hour: dict[Role, float]) -> None:
        """One round: `ready` holds each ready replica's id, role and latest stats."""
        t = self._totals
        if self._last is not None:
            dt = now - self._last
            for _, role, _ in ready:
                t.cost[role.value] += cost_per_hour[role] * dt / 3600
                t.replica_seconds[role.value] += dt
        self._last = now
        seen = {}
        for replica_id, role, stats in ready:
            before = self._seen.get(replica_id, worker_pb2.WorkerStats())
            # A worker's totals only grow; a restarted one starts again from zero.
            if stats.busy_seconds >= before.busy_seconds:
                t.busy_seconds[role.value] += stats.busy_seconds - before.busy_seconds
            if role == Role.DECODE:
                for kind, now_n, then_n in (
                    ("input", stats.prompt_tokens, before.prompt_tokens),
                    ("output", stats.generation_tokens, before.generation_tokens),
                ):
                    t.tokens[kind] += now_n - then_n if now_n >= then_n else now_n
            seen[replica_id] = stats
        self._seen = seen
        self._samples.append((now, t.copy()))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self._window_s:
            self._samples.popleft()

    def _delta(self) -> tuple[_Totals, _Totals] | None:
        if len(self._samples) < 2:
            return None
        return self._samples[0][1], self._samples[-1][1]

    def cost_per_million_tokens(self) -> dict[tuple[str, str], float]:
        """(pool, kind) -> USD per 1M tokens of that kind in the window; pool "all" sums them."""
        delta = self._delta()
        if delta is None:
            return {}
        first, last = delta
        out = {}
        for kind in KINDS:
            tokens = last.tokens[kind] - first.tokens[kind]
            if tokens <= 0:
                continue
            costs = {pool: last.cost[pool] - first.cost[pool] for pool in last.cost}
            for pool, usd in {**costs, "all": sum(costs.values())}.items():
                out[pool, kind] = usd / tokens * 1e6
        return out

    def utilization(self) -> dict[str, float]:
        """Pool -> the share of its replicas' ready time they had requests running, in the window."""
        delta = self._delta()
        if delta is None:
            return {}
        first, last = delta
        out = {}
        for pool in last.replica_seconds:
            ready = last.replica_seconds[pool] - first.replica_seconds[pool]
            if ready > 0:
                out[pool] = min(1.0, (last.busy_seconds[pool] - first.busy_seconds[pool]) / ready)
        return out
