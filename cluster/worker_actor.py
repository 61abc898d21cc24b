"""A Ray actor that owns one worker process on the node Ray placed it on.

Ray decides where (the replica's placement group carries its pool's resources) and how
many; the worker itself stays a plain process (its vLLM engine spawns its own), so the
controller sees a crash of either and replaces the replica.
"""

from __future__ import annotations

import time

import grpc

from pdcluster.cluster.replica_launcher import Process
from pdcluster.common.processes import LocalProcess, start_process, wait_ready
from pdcluster.common.worker_auth import token_metadata
from pdcluster.protos import worker_pb2, worker_pb2_grpc
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
        self._config = config
        self._address = ""  # the worker's, once it serves
        self._proc: LocalProcess = start_process(worker_process_kind(config), [*worker_args(config), *extra_args])

    def started_role(self) -> str:
        """The role it started in (a role-switching worker may have changed since: ask it)."""
        return self._role

    def wait_ready(self, timeout_s: float) -> str:
        """The worker's record (JSON) once it serves, its start marks with the placement's."""
        record = wait_ready(self._proc, timeout_s).worker
        self._address = record.address
        return record.model_copy(update={"start": record.start.model_copy(update={"placed": self._placed})}).model_dump_json()

    def process(self, ask_worker: bool, timeout_s: float) -> tuple[str, int | None]:
        """(a `Process` state, the exit code once exited). With `ask_worker`, whether the worker
        answers here, on its own node: the controller could not reach it."""
        code = self._proc.process.poll()
        if code is not None:
            return Process.EXITED, code
        if not ask_worker:
            return Process.RUNNING, None
        return (Process.SERVING if self._answers(timeout_s) else Process.HUNG), None

    def _answers(self, timeout_s: float) -> bool:
        tls = self._config.tls
        with (
            grpc.secure_channel(self._address, tls.channel_credentials())
            if tls.enabled
            else grpc.insecure_channel(self._address) as channel
        ):
            try:
                stub = worker_pb2_grpc.WorkerStub(channel)
                stub.Stats(worker_pb2.StatsRequest(), timeout=timeout_s, metadata=token_metadata(self._config.auth_token))
            except grpc.RpcError:
                return False
        return True

    def stop(self, drain: bool) -> None:
        """SIGTERM: the worker drains its running requests, then exits. Without `drain` (a dead
        or hung worker being replaced): SIGKILL, which also ends a frozen one."""
        if drain:
            self._proc.stop()
        else:
            self._proc.process.kill()
            self._proc.process.wait()
