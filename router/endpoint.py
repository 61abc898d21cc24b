"""What every model's router behind one endpoint shares: who calls (tenants, their keys and
limits, kept with the other routers' through the registry; the admin key), what each used and
its cost, and the response cache."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from pdcluster.router.config import RouterConfig
from pdcluster.router.response_cache import ResponseCache
from pdcluster.router.tenant_load_sync import TenantLoadSync
from pdcluster.router.tenant_registry import publish_tenants, registry_tenants
from pdcluster.router.tenant_usage import TenantUsage
from pdcluster.router.tenants import DEFAULT_TENANT, Tenants, configured_tenants


class Endpoint:
    def __init__(self, config: RouterConfig, cost_per_hour: Callable[[], float]) -> None:
        """`config`: the first model's router config, whose tenants, key and cache serve all;
        `cost_per_hour`: what every model's pools cost now."""
        self._api_key = config.api_key
        tenants = configured_tenants(config)
        if config.registry and tenants:
            publish_tenants(config.registry, config.cluster_name, tenants)
        elif config.registry:
            tenants = registry_tenants(config.registry, config.cluster_name)
        self.tenants = Tenants(tenants, config.api_key)
        self._load_sync = (
            TenantLoadSync(config.registry, config.cluster_name, self.tenants) if config.registry and self.tenants.limited else None
        )
        self.registry = CollectorRegistry()  # the usage metrics
        self.usage = TenantUsage(self.registry, cost_per_hour)
        self.aliases = {alias.name: alias for alias in config.aliases}
        self.alias_decisions = Counter(
            "pdcluster_router_alias_decisions",
            "Requests to a model alias, by the model it resolved to and the rule that picked it (a rule's name, default, overflow)",
            ["alias", "model", "rule"],
            registry=self.registry,
        )
        cache_url = config.response_cache.url or config.registry
        self.response_cache = ResponseCache(cache_url, config.response_cache.ttl_s, config.cluster_name) if cache_url else None
        if self.response_cache is None and any(t.response_cache for t in self.tenants.configured):
            raise ValueError("a tenant uses the response cache, which needs Redis: set response_cache.url or --registry")

    def is_admin(self, authorization: str) -> bool:
        """Whether it may see the whole cluster (its workers, every tenant's usage): the router's
        own key, or, without one, anyone but a tenant."""
        if self._api_key:
            return hmac.compare_digest(authorization, f"Bearer {self._api_key}")
        return self.tenants.identify(authorization) in (None, DEFAULT_TENANT)

    def start(self) -> None:
        if self._load_sync is not None:
            self._load_sync.start()

    async def close(self) -> None:
        if self._load_sync is not None:
            await self._load_sync.close()
        if self.response_cache is not None:
            await self.response_cache.close()
