"""vLLM's own OpenAI server, unmodified, as a local process: what pdcluster is measured
against (`bench compare`) and compared with (the parity tests)."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request

from pdcluster.common.ports import free_port
from pdcluster.common.processes import LocalProcess, spawn


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_vllm_server(
    args: list[str], env: dict, log_path: str, cpus: set[int] | None = None, timeout_s: float = 600
) -> tuple[LocalProcess, str]:
    """`python -m vllm.entrypoints.openai.api_server ARGS` on a free loopback port, once its
    /health answers; returns it and its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = LocalProcess("vllm", spawn(cmd, open(log_path, "wb"), env, cpus), log_path=log_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if proc.process.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"vLLM server did not become ready:\n{proc.log_tail()}")
        time.sleep(1)
    return proc, url
