"""What the router's `GET /cluster` answers: typed, so clients (the CLI, benchmarks, tests)
read fields, not guessed keys."""

from __future__ import annotations

from pydantic import BaseModel


class WorkerSummary(BaseModel):
    id: str
    role: str | None  # None until its first health check answers
    address: str
    healthy: bool
    pid: int
    running: int
    queued: int
    free_kv_blocks: int
    total_kv_blocks: int
    kv_bytes_sent: int
    kv_bytes_received: int
    kv_endpoint: str
    kv_transport: str
    kv_bytes_by_transport: dict[str, int]
    kv_transfers_by_transport: dict[str, int]
    draining: bool
    router_inflight: int  # requests this router has running on it


class ClusterView(BaseModel):
    model: str
    workers: list[WorkerSummary]
    prefix_index_blocks: dict[str, int]  # block hashes this router remembers per prefill worker
