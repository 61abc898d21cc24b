"""Waiting for a cluster's KV to come to rest, as a router's `/cluster` lists its workers."""

from __future__ import annotations

import time
from collections.abc import Callable


def workers_at_rest(list_workers: Callable[[], list[dict]], timeout_s: float = 30) -> list[dict]:
    """The workers `list_workers` returns (a router's `/cluster`), once none runs or queues a
    request or holds a KV block: the router's view of a worker's counters is up to a poll, a
    second, old."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = list_workers()
        if all(w["running"] == w["queued"] == 0 and w["free_kv_blocks"] == w["total_kv_blocks"] for w in workers):
            return workers
        assert time.monotonic() < deadline, workers
        time.sleep(1)
