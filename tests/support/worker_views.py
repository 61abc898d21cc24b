"""Routers' views of workers, with the stats a test gives them (no process behind)."""

from __future__ import annotations

from pdcluster.protos import worker_pb2
from pdcluster.router.worker_pool import WorkerView

BLOCK = 16


def worker(name: str, role: str, **stats) -> WorkerView:
    defaults = dict(role=role, worker_id=name, block_size=BLOCK, free_kv_blocks=1000, total_kv_blocks=1000)
    return WorkerView(address=name, stats=worker_pb2.WorkerStats(**{**defaults, **stats}), reachable=True)
