"""A Ray actor that owns one worker process on the node Ray placed it on.

Ray decides where (the replica's placement group carries its pool's resources) and how
many; the worker itself stays a plain process (its vLLM engine spawns its own), so the
controller sees a crash of either and replaces the replica.
"""

from __future__ import annotations

from cluster.local_launcher import LocalProcess, start_process, wait_ready


class WorkerActor:
    def __init__(self, role: str, args: list[str]) -> None:
        import ray

        host = ray.util.get_node_ip_address()
        self._proc: LocalProcess = start_process(role, ["--host", host, *args])

    def wait_ready(self, timeout_s: float) -> dict:
        return dict(wait_ready(self._proc, timeout_s).info, node=self._proc.info.get("address", "").rsplit(":", 1)[0])

    def exit_code(self) -> int | None:
        return self._proc.process.poll()

    def log_tail(self) -> str:
        return self._proc.log_tail()

    def stop(self) -> None:
        """SIGTERM: the worker drains its running requests, then exits."""
        self._proc.stop()
