"""Shared fixtures: the tiny model, real worker processes, the single-engine reference."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cluster.local_launcher import start_process, wait_ready
from cluster.tiny_model.generate import ensure_tiny_model
from tests.tcp_proxy import CorruptingProxy

# Small chunks so most test prompts span several chunks per layer.
KV_CHUNK_BYTES = 64 * 1024
KV_LOAD_TIMEOUT_S = 20


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def kv_data_proxy():
    """Sits in front of the decode worker's KV data channel; tests arm it to corrupt."""
    port = free_port()
    proxy = CorruptingProxy(f"127.0.0.1:{port}")
    proxy.upstream_port = port
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")  # torn down before another module starts its engines
def pd_pair(model_dir, kv_data_proxy):
    """One prefill and one decode worker process on the tiny model."""
    args = ["--kv-chunk-bytes", str(KV_CHUNK_BYTES), "--kv-load-timeout", str(KV_LOAD_TIMEOUT_S)]
    decode_args = ["--kv-data-port", str(kv_data_proxy.upstream_port), "--kv-data-advertise", kv_data_proxy.address]
    with running_pair(args, args + decode_args) as pair:
        yield pair


@contextlib.contextmanager
def running_cluster(prefill: int = 1, decode: int = 1, worker_args: list[str] = (), router_args: list[str] = ()):
    """Workers and a router in front of them, each its own process; yields (router, workers)."""
    workers = [start_process("prefill", worker_args) for _ in range(prefill)]
    workers += [start_process("decode", worker_args) for _ in range(decode)]
    started = list(workers)
    try:
        for w in workers:
            wait_ready(w)
        router = start_router([w.address for w in workers], router_args)
        started.append(router)
        yield router, workers
    finally:
        for p in started:
            p.stop()


def start_router(worker_addresses: list[str], router_args: list[str] = ()):
    """A router process on free ports in front of the given workers, ready."""
    args = ["--port", "0", "--grpc-port", "0", *router_args]
    for address in worker_addresses:
        args += ["--worker", address]
    return wait_ready(start_process("router", args))


@contextlib.contextmanager
def running_pair(prefill_args: list[str] = (), decode_args: list[str] = (), env: dict | None = None):
    """A prefill and a decode worker process, ready, stopped on exit."""
    workers = [start_process("prefill", prefill_args, env=env), start_process("decode", decode_args, env=env)]
    try:
        for w in workers:
            wait_ready(w)
        yield tuple(workers)
    finally:
        for w in workers:
            w.stop()


def reference_outputs(prompts: list[list[int]], max_tokens: int, tmp_path) -> list[list[int]]:
    prompts_path, out_path = tmp_path / "prompts.json", tmp_path / "outputs.json"
    prompts_path.write_text(json.dumps(prompts))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, "-m", "tests.reference_engine", str(prompts_path), str(out_path), str(max_tokens)],
        cwd=root, check=True, timeout=600, stdout=subprocess.DEVNULL,
    )
    return json.loads(out_path.read_text())


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_serve(args: list[str], timeout_s: float = 400) -> tuple[subprocess.Popen, list[str], dict]:
    """`pdcluster serve ARGS` in its own process group, once it prints its ready line; the
    list fills with its output lines as they come. Returns also the URLs from the ready
    line (`http`, `grpc`), so ARGS can ask for free ports (`--port 0 --grpc-port 0`)."""
    cmd = [sys.executable, "-m", "cluster.cli", "serve", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not any(line.startswith("pdcluster ready") for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_serve(proc, timeout_s=30)
            raise RuntimeError("pdcluster serve did not become ready:\n" + "".join(lines[-40:]))
        time.sleep(0.5)
    ready = next(line for line in lines if line.startswith("pdcluster ready"))
    urls = {"http": ready.split()[2].removesuffix("/v1"), "grpc": ready.split("grpc ")[1].split(",")[0]}
    return proc, lines, urls


def stop_serve(proc: subprocess.Popen, timeout_s: float = 180) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
