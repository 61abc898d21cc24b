"""Starting pdcluster processes (workers, the router) on this machine and waiting until they
serve; and other HTTP servers (vLLM's own, Prometheus) until a URL of theirs answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pdcluster.common.process_lifetime import die_with_parent
from pdcluster.common.worker_record import Role, RouterRecord, WorkerRecord


@dataclass
class LocalProcess:
    role: str
    process: subprocess.Popen
    log_path: str = ""
    ready_file: str = ""  # the process writes its record here once it serves
    record: WorkerRecord | RouterRecord | None = None  # read from `ready_file` by wait_ready

    @property
    def worker(self) -> WorkerRecord:
        assert isinstance(self.record, WorkerRecord), f"{self.role} is not a ready worker"
        return self.record

    @property
    def router(self) -> RouterRecord:
        assert isinstance(self.record, RouterRecord), f"{self.role} is not a ready router"
        return self.record

    @property
    def address(self) -> str:
        return self.worker.address

    @property
    def kv_endpoint(self) -> str:
        return self.worker.kv_endpoint

    def stop(self, timeout: float = 30.0) -> None:
        stop_all([self], timeout)

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])


def stop_all(processes: Sequence[LocalProcess | None], timeout: float = 30.0) -> None:
    """SIGTERM to every running one at once (each drains and shuts its engine down meanwhile),
    then wait; whatever is still running after `timeout` is killed."""
    running = [p.process for p in processes if p is not None and p.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)  # a frozen process acts on it only once thawed
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_http_server(
    name: str, cmd: list[str], env: dict, log_path: str, ready_url: str, cpus=None, timeout_s: float = 600
) -> LocalProcess:
    """Spawn `cmd` and wait until GET `ready_url` answers 200; a process that exits or is not
    ready in time is stopped, and the error carries its log's tail."""
    proc = LocalProcess(name, spawn(cmd, open(log_path, "wb"), env, cpus), log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while not _answers(ready_url):
        if proc.process.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"{name} did not become ready:\n{proc.log_tail()}")
        time.sleep(0.2)
    return proc


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# What each kind of process runs; each writes its ready file once it serves.
ROLE_SWITCHING = "role_switching"  # a worker that can move between the pools
_MODULES = {
    Role.PREFILL: "pdcluster.prefill_worker",
    Role.DECODE: "pdcluster.decode_worker",
    ROLE_SWITCHING: "pdcluster.role_switching_worker",
    "router": "pdcluster.router",
}


def start_process(
    role: str,
    args: Sequence[str] = (),
    env: dict | None = None,
    log_dir: str | None = None,
    cpus: set[int] | None = None,
    prefix: Sequence[str] = (),
) -> LocalProcess:
    """Spawn a `role` process (prefill, decode, role_switching or router), on the given CPU cores if any;
    `prefix` runs it elsewhere, e.g. on a lab host. `wait_ready` blocks until it serves."""
    run_dir = tempfile.mkdtemp(prefix=f"pdcluster-{role}-", dir=log_dir)
    ready = os.path.join(run_dir, "ready.json")
    log_path = os.path.join(run_dir, f"{role}.log")
    cmd = [*prefix, sys.executable, "-m", _MODULES[role], "--ready-file", ready, *args]
    log = open(log_path, "wb")
    return LocalProcess(role=role, process=spawn(cmd, log, env, cpus), log_path=log_path, ready_file=ready)


def spawn(cmd: list[str], log, env: dict | None = None, cpus: set[int] | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session, writing to `log`, confined to `cpus` when given
    (children and threads inherit the mask); it dies with this process."""

    def in_child() -> None:
        die_with_parent(signal.SIGTERM)  # no orphans if the launcher dies
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=in_child
    )


def wait_ready(proc: LocalProcess, timeout: float = 300.0, cancel=None) -> LocalProcess:
    """Block until the process serves; `cancel` (a threading.Event) set means give up."""
    ready = proc.ready_file
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.role} process exited with {proc.process.returncode} (log: {proc.log_path}):\n{proc.log_tail()}")
        if cancel is not None and cancel.is_set():
            raise InterruptedError(f"stopped waiting for the {proc.role} process")
        if time.monotonic() > deadline:
            proc.stop()
            raise TimeoutError(f"{proc.role} process not ready after {timeout}s (log: {proc.log_path}):\n{proc.log_tail()}")
        time.sleep(0.2)
    record_type = RouterRecord if proc.role == "router" else WorkerRecord
    proc.record = record_type.model_validate_json(Path(ready).read_text())
    return proc
