"""Who a worker is and where it listens: the record a worker writes to its ready file,
announces in the registry, and the controller keeps for each replica."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from pdcluster.common.start_marks import StartMarks


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


ROLES = (Role.PREFILL, Role.DECODE)


def other_role(role: Role) -> Role:
    return Role.DECODE if role == Role.PREFILL else Role.PREFILL


class WorkerRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    worker_id: str
    role: Role
    address: str  # host:port of its Worker gRPC service
    kv_endpoint: str  # host:port of its engine's KVTransfer service
    metrics_port: int
    pid: int
    start: StartMarks = StartMarks()  # when each step of its start happened

    @property
    def node(self) -> str:
        return self.address.rsplit(":", 1)[0]


class RouterRecord(BaseModel):
    """What a router writes to its ready file once both APIs listen."""

    model_config = ConfigDict(frozen=True)

    http: str  # base URL of the OpenAI API
    grpc: str  # host:port of the Inference service
    model: str  # the first model's served name
    models: list[str]  # every model's served names, the first model's first
    pid: int


class ServeRecord(BaseModel):
    """What `pdcluster serve --ready-file` writes once the cluster serves."""

    model_config = ConfigDict(frozen=True)

    router: RouterRecord | None  # None with --no-router
    ray_address: str  # the Ray cluster's GCS address: `pdcluster status --address` finds this cluster there
    prefill_workers: int
    decode_workers: int
    pid: int
