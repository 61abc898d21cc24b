"""`pdcluster bench prefix`: how well each way of choosing prefill workers finds cached prefixes.

A trace whose requests share prefixes (the Mooncake conversation trace: its `hash_ids`
become shared token prefixes) is replayed on two prefill workers and one decode worker,
once per `--prefill-routing` mode, each time on fresh engines: `kv-events` (what the
engines say they hold), `guess` (where the router sent prompts before) and `round-robin`.
It reports the prefix-cache hit rate (prompt tokens the engines served from cache, as
vLLM counts them, over all prompt tokens) and TTFT. The ceiling, from the same trace: the
hit rate of one unbounded cache that every request passes through. And the KV moved per
request (what every worker received: the decode worker's prompts, and the prefixes prefill
workers pulled from peers), against the KV of the request's new tokens (those no earlier
request had: what the ceiling computes): 1x moves each turn's new tokens once.

With `--kv-offloading-size GiB`, each mode runs again with that host KV tier under every
worker's engine cache (`--num-gpu-blocks-override` shrinks the engine cache to this machine's
scale); `--workload agentic` replays multi-turn agent sessions instead of a trace.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Sequence

import httpx

from pdcluster.bench.compare_bench import trace_rate
from pdcluster.bench.serve_bench import RateResult, replay
from pdcluster.common.openai_stream import served_model
from pdcluster.common.percentiles import format_ms
from pdcluster.common.processes import stop_all
from pdcluster.common.worker_record import Role
from pdcluster.kv_transfer.kv_transfer_service import fetch_kv_stats
from pdcluster.planner.local_cluster import start_pdcluster
from pdcluster.planner.workloads import RequestShape
from pdcluster.router.config import PREFILL_ROUTING_MODES
from pdcluster.worker.config import EngineConfig


def ideal_hit_rate(trace: list[RequestShape], block_size: int) -> float:
    """Cached prompt tokens over prompt tokens if every request found every block an earlier
    one had (vLLM computes at least a prompt's last token)."""
    total = sum(r.input_tokens for r in trace)
    return 1 - new_tokens(trace, block_size) / total if total else 0.0


def new_tokens(trace: list[RequestShape], block_size: int) -> int:
    """Prompt tokens no earlier request had (in whole blocks; at least each prompt's last token)."""
    seen: set[int] = set()
    computed = 0
    for r in trace:
        hashes = r.block_hashes(block_size)
        leading = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        computed += r.input_tokens - min(leading * block_size, r.input_tokens - 1)
        seen.update(hashes)
    return computed


def kv_bytes_per_token(model: str, dtype_bytes: int = 4) -> int:
    """K and V of one token in every layer (float32 by default, as this bench runs)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * config.num_key_value_heads * head * 2 * dtype_bytes


def run_mode(
    mode: str,
    engine: EngineConfig,
    trace: list[RequestShape],
    vocab: int,
    slo_ttft_ms: float,
    slo_itl_ms: float,
    router_flags: Sequence[str],
    kv_transport: str,
) -> tuple[RateResult, int, int]:
    """The replay's result, the KV bytes the workers received during it, and the prompts whose
    prefill worker pulled a prefix from a peer."""
    cpus = sorted(os.sched_getaffinity(0))
    half = max(1, len(cpus) // 2)
    pools = [(Role.PREFILL, set(cpus[:half])), (Role.PREFILL, set(cpus[half:] or cpus)), (Role.DECODE, set(cpus))]
    log_dir = tempfile.mkdtemp(prefix=f"pdcluster-prefix-{mode}-")
    print(f"{mode}: 2 prefill workers + 1 decode worker (logs in {log_dir})...", flush=True)
    flags = ["--prefill-routing", mode, "--enable-prompt-tokens-details", *router_flags]
    processes, url = start_pdcluster(engine, pools, log_dir, flags, kv_transport)
    workers = [p for p in processes if p.role in (Role.PREFILL, Role.DECODE)]

    def received() -> int:
        return sum(asyncio.run(fetch_kv_stats(w.kv_endpoint)).bytes_received for w in workers)

    try:
        model = asyncio.run(served_model(url))
        before = received()
        result = replay(url, model, trace_rate(trace), trace, vocab, slo_ttft_ms, slo_itl_ms)
        return result, received() - before, round(router_metric(url, "pdcluster_router_peer_pulls_total"))
    finally:
        stop_all(processes)


def router_metric(url: str, name: str) -> float:
    """The sum of a router metric's series, from its /metrics."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def main(
    trace: list[RequestShape],
    modes: tuple[str, ...] = PREFILL_ROUTING_MODES,
    slo_ttft_ms: float = 1000.0,
    slo_itl_ms: float = 100.0,
    block_size: int = 128,
    json_output: bool = False,
    tier_gib: float = 0.0,
    engine_blocks: int = 0,
    router_flags: Sequence[str] = (),
    kv_transport: str = "auto",
) -> dict:
    from transformers import AutoTokenizer

    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    # float32: vLLM's CPU engine core dies on its first bfloat16 request when eager, on this machine
    engine = EngineConfig(model=str(ensure_tiny_model()), enforce_eager=True, dtype="float32")
    if engine_blocks:
        engine = EngineConfig(**engine.model_dump(), num_gpu_blocks_override=engine_blocks)
    runs = {mode: (mode, engine) for mode in modes}
    if tier_gib:
        tiered = EngineConfig(**engine.model_dump(), kv_offloading_size=tier_gib)
        runs |= {f"{mode} + tier": (mode, tiered) for mode in modes}
    vocab = len(AutoTokenizer.from_pretrained(engine.model))
    runs_out = {
        label: run_mode(mode, config, trace, vocab, slo_ttft_ms, slo_itl_ms, router_flags, kv_transport)
        for label, (mode, config) in runs.items()
    }
    results = {label: result for label, (result, _, _) in runs_out.items()}
    ceiling = ideal_hit_rate(trace, block_size)
    prompt_tokens = sum(r.input_tokens for r in trace)
    new_kv = new_tokens(trace, block_size) * kv_bytes_per_token(engine.model)  # the KV of every turn's new tokens
    moved = {label: kv for label, (_, kv, _) in runs_out.items()}
    pulls = {label: n for label, (_, _, n) in runs_out.items()}
    cache = f"engine cache {engine_blocks} blocks" if engine_blocks else "engine cache as configured"
    flags = f"; router {' '.join(router_flags)}" if router_flags else ""
    print(
        f"\n{len(trace)} requests at {trace_rate(trace):g} req/s, {cache}; tier {tier_gib:g} GiB per worker; KV over {kv_transport}{flags}"
    )
    print(f"ceiling (one unbounded cache): {ceiling:.1%} of prompt tokens cached")
    print(
        f"{'routing':<20} {'done':>5} {'hit rate':>9} {'/ ceiling':>9} {'recomputed':>11} {'KV moved/req':>13} {'/ new KV':>9} "
        f"{'TTFT p50/p90/p99 ms':>22} {'pulls':>6}"
    )
    recomputed = {label: round(prompt_tokens * (1 - (r.prefix_cache_hit_rate or 0.0))) for label, r in results.items()}
    for label, r in results.items():
        hit = r.prefix_cache_hit_rate or 0.0
        per_request = moved[label] / max(1, r.completed)
        print(
            f"{label:<20} {r.completed:>5} {hit:>9.1%} {hit / ceiling if ceiling else 0:>9.2f} {recomputed[label]:>11} "
            f"{per_request / 2**20:>9.2f} MiB {moved[label] / new_kv if new_kv else 0:>8.2f}x {format_ms(r.ttft_ms):>22} {pulls[label]:>6}"
        )
        for error in r.errors:
            print(f"{'':<20} failed: {error}")
    report = {
        "requests": len(trace),
        "rate": trace_rate(trace),
        "block_size": block_size,
        "engine_blocks": engine_blocks,
        "tier_gib": tier_gib,
        "ceiling_hit_rate": round(ceiling, 4),
        "router_flags": list(router_flags),
        "kv_transport": kv_transport,
        "new_tokens_kv_bytes": new_kv,
        "modes": {
            label: {
                "prefix_cache_hit_rate": r.prefix_cache_hit_rate,
                "prompt_tokens_recomputed": recomputed[label],
                "kv_bytes_moved": moved[label],  # received by every worker (pulls included)
                "peer_pulls": pulls[label],
                "kv_bytes_moved_per_request": round(moved[label] / max(1, r.completed)),
                "kv_moved_over_new_tokens_kv": round(moved[label] / new_kv, 3) if new_kv else None,
                "ttft_ms": r.ttft_ms,
                "completed": r.completed,
                "failed": r.failed,
                "errors": r.errors,
            }
            for label, r in results.items()
        },
    }
    if json_output:
        print(json.dumps(report))
    return report
