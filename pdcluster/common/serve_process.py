"""`pdcluster serve` as a user runs it: its own process group, ready once it writes its
`--ready-file` (a ServeRecord). Used by the cluster tests and `pdcluster bench chaos`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pdcluster.common.worker_record import ServeRecord


def launch_serve(
    args: list[str], timeout_s: float = 400, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> tuple[subprocess.Popen, list[str], ServeRecord]:
    """`pdcluster serve ARGS` in its own process group (with `env` over ours), once it serves;
    the list fills with its output lines as they come. Returns also its ServeRecord (the
    router's URLs: ARGS can ask for free ports, `--port 0 --grpc-port 0`). `prefix` runs it
    elsewhere, e.g. on a lab host."""
    ready = Path(tempfile.mkdtemp(prefix="pdcluster-serve-")) / "ready.json"
    cmd = [*prefix, sys.executable, "-m", "pdcluster", "serve", "--ready-file", str(ready), *args]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_serve(proc, timeout_s=30)
            raise RuntimeError("pdcluster serve did not become ready:\n" + "".join(lines[-40:]))
        time.sleep(0.5)
    return proc, lines, ServeRecord.model_validate_json(ready.read_text())


def stop_serve(proc: subprocess.Popen, timeout_s: float = 180) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
