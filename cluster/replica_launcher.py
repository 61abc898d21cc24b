"""The seam between the controller's decisions and where replicas actually run.

The controller decides how many replicas each pool has and which to replace; a
`ReplicaLauncher` starts, watches and stops them. `RayReplicaLauncher` (cluster/ray_launcher.py)
places each replica with Ray; tests drive the controller with a fake one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from pdcluster.cluster.cluster_spec import PoolSpec
from pdcluster.common.worker_record import Role, WorkerRecord
from pdcluster.protos import worker_pb2
from pdcluster.worker.config import WorkerConfig

# Whatever a launcher needs to find its replica again: opaque to the controller, each
# launcher's own type (a Ray actor and placement group, a fake's record).
ReplicaHandle = Any


REPLICA_ID_PREFIX = "replica-"  # replica ids name no role: a replica may switch pools


class Process(StrEnum):
    """What a replica's own node says of its worker process."""

    RUNNING = "running"  # it runs (its node was not asked more)
    SERVING = "serving"  # it answers its node: whoever cannot reach it is cut off from it
    HUNG = "hung"  # it runs, but does not answer even on its own node
    EXITED = "exited"
    NODE_UNREACHABLE = "node unreachable"  # a partition, or a host gone: Ray rules which


class ProcessReport(NamedTuple):
    process: Process
    exit_code: int | None = None  # once EXITED (-1: its node is gone)


class LiveReplica(NamedTuple):
    """A replica found running, started by an earlier life of the controller."""

    replica_id: str
    role: Role  # the one it started in; the controller asks the worker which it serves now
    handle: ReplicaHandle


class ReplicaLauncher(Protocol):
    def node_address(self) -> str:
        """Where the controller itself runs (its metrics endpoint binds there)."""

    def launch(self, config: WorkerConfig, pool: PoolSpec) -> ReplicaHandle:
        """Start a replica of `pool` running `config`; returns at once."""

    async def wait_ready(self, handle: ReplicaHandle, timeout_s: float) -> WorkerRecord:
        """The replica's record once it serves; raises if it fails to start."""

    async def process(self, handle: ReplicaHandle, ask_worker: bool) -> ProcessReport:
        """Whether the replica's process runs and, with `ask_worker` (the controller cannot
        reach it), whether it answers on its own node."""

    async def live_replicas(self) -> list[LiveReplica]:
        """The replicas of this cluster still running, so a restarted controller adopts them
        instead of starting new ones; leftovers of dead ones are cleaned up."""

    async def stop(self, handle: ReplicaHandle, drain: bool) -> None:
        """Stop the replica (after its running requests finish, when `drain`) and free its resources."""


class WorkerProbe(Protocol):
    async def stats(self, record: WorkerRecord) -> worker_pb2.WorkerStats:
        """The worker's current load; raises when it does not answer in time."""

    async def switch_role(self, record: WorkerRecord, role: Role) -> None:
        """Move a role-switching worker to `role` (it drains first); raises if it did not switch."""

    async def forget(self, record: WorkerRecord) -> None:
        """The worker is gone: drop what was kept to reach it."""
