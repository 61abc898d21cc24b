"""What the router's `GET /cluster` answers: typed, so clients (the CLI, benchmarks, tests)
read fields, not guessed keys."""

from __future__ import annotations

from pydantic import BaseModel


class WorkerSummary(BaseModel):
    id: str
    role: str | None  # None until its first health check answers
    address: str
    metrics_port: int  # 0 until its first health check answers
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
    lora_adapters: list[str]  # the LoRA adapters its engine holds loaded
    kv_compatibility: dict[str, str] = {}  # what a peer must match to exchange KV with it
    # Wall-clock marks of its start as this router saw it (0 until then): membership, the
    # first request sent to it, that request's first token.
    joined_at: float
    first_routed_at: float
    first_token_at: float


class ClusterView(BaseModel):
    model: str
    workers: list[WorkerSummary]
    prefix_index_blocks: dict[str, int]  # block hashes this router remembers per prefill worker
    models: dict[str, list[str]]  # each model (its first served name): its workers' ids


class ScrapeTargets(BaseModel):
    """One entry of Prometheus's HTTP service discovery (`http_sd_configs`): a worker's metrics
    endpoint. The `__meta_` labels are there for relabelling; the series carry role and id."""

    targets: list[str]
    labels: dict[str, str]


def scrape_targets(workers: list[WorkerSummary]) -> list[ScrapeTargets]:
    return [
        ScrapeTargets(
            targets=[f"{w.address.rsplit(':', 1)[0]}:{w.metrics_port}"],
            labels={"__meta_pdcluster_role": w.role or "", "__meta_pdcluster_worker_id": w.id},
        )
        for w in workers
        if w.metrics_port
    ]
