"""Starting worker processes on this machine and waiting until they serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class WorkerProcess:
    role: str
    process: subprocess.Popen
    info: dict = field(default_factory=dict)
    log_path: str = ""

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def kv_endpoint(self) -> str:
        return self.info["kv_endpoint"]

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])


def start_worker(role: str, args: list[str] = (), env: dict | None = None, log_dir: str | None = None) -> WorkerProcess:
    """Spawn `python -m {role}_worker`; call `wait_ready` to block until it serves."""
    run_dir = tempfile.mkdtemp(prefix=f"pdcluster-{role}-", dir=log_dir)
    ready = os.path.join(run_dir, "ready.json")
    log_path = os.path.join(run_dir, "worker.log")
    cmd = [sys.executable, "-m", f"{role}_worker", "--ready-file", ready, *args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True,
    )
    worker = WorkerProcess(role=role, process=proc, log_path=log_path)
    worker.info["ready_file"] = ready
    return worker


def wait_ready(worker: WorkerProcess, timeout: float = 300.0) -> WorkerProcess:
    ready = worker.info["ready_file"]
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if worker.process.poll() is not None:
            raise RuntimeError(f"{worker.role} worker exited with {worker.process.returncode}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            worker.stop()
            raise TimeoutError(f"{worker.role} worker not ready after {timeout}s:\n{worker.log_tail()}")
        time.sleep(0.2)
    with open(ready) as f:
        worker.info.update(json.load(f))
    return worker
