"""Tenants kept in the Redis registry, for several routers: a router given tenants (spec, file or
Secret) writes them there, replacing what was there, so the configured set is the one that
holds; a router given none serves the registry's. Read once, at start: the API keys go to
vLLM's key check, which is built once."""

from __future__ import annotations

from pydantic import TypeAdapter

from pdcluster.router.config import TenantConfig
from pdcluster.router.registry_values import publish_value, read_value

_TENANTS = TypeAdapter(list[TenantConfig])


def _key(cluster_name: str) -> str:
    return f"pdcluster:{cluster_name}:tenants"


def publish_tenants(url: str, cluster_name: str, tenants: list[TenantConfig]) -> None:
    publish_value(url, _key(cluster_name), _TENANTS.dump_json(tenants), "tenants")


def registry_tenants(url: str, cluster_name: str) -> list[TenantConfig]:
    stored = read_value(url, _key(cluster_name), "tenants")
    return _TENANTS.validate_json(stored) if stored else []
