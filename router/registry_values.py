"""Router settings kept in the Redis registry, for several routers: one writes them, the
others read them once, at start."""

from __future__ import annotations

import logging
import time

import redis

logger = logging.getLogger("pdcluster.router.registry")
READ_WAIT_S = 30.0  # a registry restarting; past this, the router does not start (it would serve without them)


def publish_value(url: str, key: str, value: bytes, what: str) -> None:
    """Best effort: the router writing serves its own settings either way."""
    client = redis.Redis.from_url(url)
    try:
        client.set(key, value)
    except redis.RedisError as e:
        logger.warning("could not keep the %s in the registry (other routers will not see them): %s", what, e)
    finally:
        client.close()


def read_value(url: str, key: str, what: str) -> bytes | None:
    client = redis.Redis.from_url(url, socket_timeout=5)
    deadline = time.monotonic() + READ_WAIT_S
    try:
        while True:
            try:
                stored = client.get(key)
                return stored.encode() if isinstance(stored, str) else stored
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the registry at {url} does not answer, so its {what} are unknown: {e}") from e
                time.sleep(1.0)
    finally:
        client.close()
