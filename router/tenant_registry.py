"""Tenants kept in the Redis registry, for several routers: a router given tenants (spec, file or
Secret) writes them there, replacing what was there, so the configured set is the one that
holds; a router given none serves the registry's. Read once, at start: the API keys go to
vLLM's key check, which is built once."""

from __future__ import annotations

import logging
import time

import redis
from pydantic import TypeAdapter

from pdcluster.router.config import TenantConfig

logger = logging.getLogger("pdcluster.router.tenants")
_TENANTS = TypeAdapter(list[TenantConfig])
READ_WAIT_S = 30.0  # a registry restarting; past this, the router does not start (it would serve without keys)


def _key(cluster_name: str) -> str:
    return f"pdcluster:{cluster_name}:tenants"


def publish_tenants(url: str, cluster_name: str, tenants: list[TenantConfig]) -> None:
    """Best effort: this router serves its own tenants either way."""
    client = redis.Redis.from_url(url)
    try:
        client.set(_key(cluster_name), _TENANTS.dump_json(tenants))
    except redis.RedisError as e:
        logger.warning("could not keep the tenants in the registry (other routers will not see them): %s", e)
    finally:
        client.close()


def registry_tenants(url: str, cluster_name: str) -> list[TenantConfig]:
    client = redis.Redis.from_url(url, socket_timeout=5)
    deadline = time.monotonic() + READ_WAIT_S
    try:
        while True:
            try:
                stored = client.get(_key(cluster_name))
                return _TENANTS.validate_json(stored) if stored else []
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the registry at {url} does not answer, so its tenants are unknown: {e}") from e
                time.sleep(1.0)
    finally:
        client.close()
