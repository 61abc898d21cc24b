"""vLLM's own OpenAI server, unmodified, as a local process: what pdcluster is measured
against (`bench compare`) and compared with (the parity tests)."""

from __future__ import annotations

import sys

from pdcluster.common.ports import free_port
from pdcluster.common.processes import LocalProcess, start_http_server


def start_vllm_server(
    args: list[str], env: dict, log_path: str, cpus: set[int] | None = None, timeout_s: float = 600
) -> tuple[LocalProcess, str]:
    """`python -m vllm.entrypoints.openai.api_server ARGS` on a free loopback port, once its
    /health answers; returns it and its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    return start_http_server("vLLM server", cmd, env, log_path, url + "/health", cpus, timeout_s), url
