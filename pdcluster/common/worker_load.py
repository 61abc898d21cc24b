"""What a worker's `WorkerStats` say of its KV cache (read by routers and the controller alike)."""

from __future__ import annotations


def kv_cache_usage(stats) -> float:
    """The share of its KV blocks in use (0 before it reports a cache)."""
    return 1.0 - stats.free_kv_blocks / stats.total_kv_blocks if stats.total_kv_blocks else 0.0


def decode_context_tokens(stats) -> int:
    """The tokens in its KV cache: what its decode steps read."""
    return int(stats.total_kv_blocks - stats.free_kv_blocks) * max(stats.block_size, 1)
