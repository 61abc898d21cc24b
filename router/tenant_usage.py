"""What each tenant used, per model: requests, prompt, cached and generated tokens, to
Prometheus and to `/v1/usage`, with each tenant's share of the cluster's cost: the pools'
healthy replicas at their `cost_per_hour`, accrued while this router runs, shared by tokens."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass
class UsageFigures:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: UsageFigures) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class TenantUsage:
    def __init__(self, registry: CollectorRegistry, cost_per_hour: Callable[[], float]) -> None:
        """`cost_per_hour`: what the cluster costs now (its replicas at their pools' rates)."""
        self._figures: dict[str, dict[str, UsageFigures]] = defaultdict(lambda: defaultdict(UsageFigures))
        self._cost_per_hour = cost_per_hour
        self._since = self._accrued_at = time.time()
        self._cost_usd = 0.0
        labels = ["tenant", "model"]
        self._requests = Counter("pdcluster_tenant_requests", "Requests served, per tenant and model", labels, registry=registry)
        self._prompt = Counter("pdcluster_tenant_prompt_tokens", "Prompt tokens, per tenant and model", labels, registry=registry)
        self._cached = Counter(
            "pdcluster_tenant_cached_tokens", "Prompt tokens served from a cache, per tenant and model", labels, registry=registry
        )
        self._generated = Counter("pdcluster_tenant_generation_tokens", "Generated tokens, per tenant and model", labels, registry=registry)
        self._refusals = Counter(
            "pdcluster_tenant_refusals",
            "Requests refused for a tenant's limit (concurrency, tokens) or a model it may not use (model)",
            ["tenant", "reason"],
            registry=registry,
        )

    def refused(self, tenant: str, reason: str) -> None:
        self._refusals.labels(tenant, reason).inc()

    def _accrue(self) -> None:
        """The cost since the last call, at the current rate (replicas change rarely)."""
        now = time.time()
        self._cost_usd += self._cost_per_hour() * (now - self._accrued_at) / 3600
        self._accrued_at = now

    def record(self, tenant: str, model: str, used: UsageFigures) -> None:
        self._accrue()
        self._figures[tenant][model].add(used)
        self._requests.labels(tenant, model).inc(used.requests)
        self._prompt.labels(tenant, model).inc(used.prompt_tokens)
        self._cached.labels(tenant, model).inc(used.cached_tokens)
        self._generated.labels(tenant, model).inc(used.completion_tokens)

    def report(self, tenants: list[str] | None = None) -> dict:
        """Usage of `tenants` (None: all), with cost: the cluster's cost since this router
        started, shared by tokens served."""
        self._accrue()
        all_tokens = sum(f.tokens for models in self._figures.values() for f in models.values())
        out: dict = {"since": self._since, "cost_usd": round(self._cost_usd, 6), "cost_per_hour": self._cost_per_hour(), "tenants": {}}
        for tenant, models in self._figures.items():
            if tenants is not None and tenant not in tenants:
                continue
            total = UsageFigures()
            for figures in models.values():
                total.add(figures)
            cost = self._cost_usd * total.tokens / all_tokens if all_tokens else 0.0
            out["tenants"][tenant] = {
                **asdict(total),
                "models": {model: asdict(f) for model, f in models.items()},
                "cost_usd": round(cost, 6),
                "usd_per_1k_requests": round(cost * 1000 / total.requests, 6) if total.requests else None,
                "usd_per_million_tokens": round(cost * 1e6 / total.tokens, 6) if total.tokens else None,
            }
        return out
