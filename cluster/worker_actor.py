"""A Ray actor that owns one worker process on the node Ray placed it on.

Ray decides where (the replica's placement group carries its pool's resources) and how
many; the worker itself stays a plain process (its vLLM engine spawns its own), so the
controller sees a crash of either and replaces the replica.
"""

from __future__ import annotations

import time

from pdcluster.common.processes import LocalProcess, start_process, wait_ready
from pdcluster.worker.config import ENGINE_ARGS_CHECKED, WorkerConfig, worker_args, worker_process_kind


class WorkerActor:
    def __init__(self, config_json: str, extra_args: list[str]) -> None:
        import ray

        self._placed = time.time()  # Ray placed it and its process runs: the start's first mark
        # The controller checked the engine arguments; the worker checks them again as it starts.
        config = WorkerConfig.model_validate_json(config_json, context={ENGINE_ARGS_CHECKED: True})
        if not config.host:  # the address of the node it runs on, which only the actor knows
            config = config.model_copy(update={"host": ray.util.get_node_ip_address()})
        self._role = config.role
        self._proc: LocalProcess = start_process(worker_process_kind(config), [*worker_args(config), *extra_args])

    def started_role(self) -> str:
        """The role it started in (a role-switching worker may have changed since: ask it)."""
        return self._role

    def wait_ready(self, timeout_s: float) -> str:
        """The worker's record (JSON) once it serves, its start marks with the placement's."""
        record = wait_ready(self._proc, timeout_s).worker
        return record.model_copy(update={"start": record.start.model_copy(update={"placed": self._placed})}).model_dump_json()

    def exit_code(self) -> int | None:
        return self._proc.process.poll()

    def stop(self, drain: bool) -> None:
        """SIGTERM: the worker drains its running requests, then exits. Without `drain` (a dead
        or hung worker being replaced): SIGKILL, which also ends a frozen one."""
        if drain:
            self._proc.stop()
        else:
            self._proc.process.kill()
            self._proc.process.wait()
