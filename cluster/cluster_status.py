"""What the controller reports (`controller.status()`, `pdcluster status [--json]`): typed, so
the CLI, benchmarks and tests read fields, not guessed keys."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from pdcluster.cluster.autoscaler import ScalingDecision
from pdcluster.common.start_marks import StartMarks
from pdcluster.common.worker_record import Role


@dataclass
class Heal:
    role: Role
    replaced: str
    reason: str
    detected_at: float
    replacement: str = ""
    ready_at: float = 0.0
    seconds: float = 0.0


@dataclass
class StartFailure:
    """A replica whose worker died or hung before it served: why, in its own log's words."""

    role: Role
    replica: str
    cause: str  # the error, with its log's path and last lines
    at: float


class PoolStatus(BaseModel):
    target: int
    min: int
    max: int
    ready: int
    failed_starts_in_a_row: int  # since the last replica that started; `pdcluster serve` gives up at 3
    outdated: int = 0  # replicas a rolling restart has yet to replace
    resources: dict[str, float]  # one replica's placement-group bundle


class ReplicaStatus(BaseModel):
    id: str
    role: Role
    state: str  # starting | ready | switching | draining
    address: str
    node: str
    pid: int
    running: int
    queued: int
    free_kv_blocks: int
    total_kv_blocks: int
    age_s: float
    decided_at: float  # when the controller decided to start it (time.time())
    start: StartMarks | None  # its worker's start marks, once it serves
    cut_off: str = ""  # why it is kept though the controller cannot reach it (a partition)


class ClusterStatus(BaseModel):
    name: str
    metrics_address: str
    controller_pid: int
    pools: dict[Role, PoolStatus]
    replicas: list[ReplicaStatus]
    autoscaling: bool
    decisions: list[ScalingDecision]
    heals: list[Heal]
    start_failures: list[StartFailure]
