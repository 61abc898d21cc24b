"""A real Prometheus server (the `prometheus` binary from apt) for tests that scrape a cluster
the way the shipped config does, and its HTTP query API."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import httpx
import yaml

from pdcluster.common.ports import free_port
from pdcluster.common.processes import start_http_server


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        """The instant vector `expr` evaluates to now."""
        answer = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def active_targets(self) -> list[dict]:
        return httpx.get(self.url + "/api/v1/targets", timeout=30).json()["data"]["activeTargets"]

    def wait_for_targets(self, count: int, timeout_s: float = 60) -> list[dict]:
        """Wait until `count` targets are found and each has been scraped successfully."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            targets = self.active_targets()
            if len(targets) >= count and all(t["health"] == "up" for t in targets):
                return targets
            time.sleep(0.5)
        raise AssertionError(f"Prometheus found {len(targets)} targets, not {count} up: {targets}")


@contextlib.contextmanager
def running_prometheus(config: dict, directory: Path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (scripts/install.sh installs it from apt)"
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address={url.removeprefix('http://')}",
    ]
    server = start_http_server("prometheus", cmd, {}, str(directory / "prometheus.log"), url + "/-/ready", timeout_s=60)
    try:
        yield Prometheus(url)
    finally:
        server.stop()
