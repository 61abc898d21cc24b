"""`pdcluster serve` as a user runs it: its own process group, read by its output lines.
Used by the cluster tests and `pdcluster bench chaos`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def launch_serve(args: list[str], timeout_s: float = 400) -> tuple[subprocess.Popen, list[str], dict]:
    """`pdcluster serve ARGS` in its own process group, once it prints its ready line; the
    list fills with its output lines as they come. Returns also the URLs from the ready
    line (`http`, `grpc`), so ARGS can ask for free ports (`--port 0 --grpc-port 0`)."""
    cmd = [sys.executable, "-m", "pdcluster", "serve", *args]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
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
