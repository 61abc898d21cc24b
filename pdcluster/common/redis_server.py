"""A private `redis-server` on loopback, for tests and benchmarks that need a registry."""

from __future__ import annotations

import subprocess
import time

import redis

from pdcluster.common.ports import free_port


def start_redis(port: int = 0, timeout_s: float = 20.0) -> tuple[subprocess.Popen, str]:
    """A fresh, memory-only redis-server on 127.0.0.1 (a free port unless `port`), once it answers."""
    port = port or free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return server, url
        except redis.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.1)
