"""`pdcluster bench latency`: the price of disaggregating, one request at a time.

On an idle machine, prompts of each length go one at a time, alternating, to (a) vLLM's own
OpenAI server (the ceiling: one engine, nothing in between) and to pdcluster's 1P+1D on the
same model and engine flags, (b) on the disaggregated path (every prompt to the prefill
worker) and (c) on the bypass path (every prompt on the decode worker alone), through two
routers over the same workers. Every process may use every core (at concurrency 1 only one
engine computes at a time), or with `pin_workers` the prefill worker the first core and the
decode worker the second. Prompts are random tokens, new each time, so no prefix cache helps.
It prints TTFT and ITL medians of each and what pdcluster adds to vLLM's.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
from dataclasses import asdict, dataclass

import aiohttp

from pdcluster.bench.compare_bench import start_colocated, start_pdcluster, start_router
from pdcluster.bench.serve_bench import RequestResult, served_model, stream_request
from pdcluster.common.processes import stop_all, wait_ready
from pdcluster.common.worker_record import Role
from pdcluster.worker.config import EngineConfig

PATHS = ("vllm", "disaggregated", "bypass")
ROUTER_PATH_FLAGS = {"disaggregated": ["--bypass-prefill-below", "1"], "bypass": ["--bypass-prefill-below", "1000000"]}


@dataclass
class PathLatency:
    prompt_tokens: int
    path: str
    ttft_p50_ms: float
    itl_p50_ms: float
    requests: int
    added_ttft_p50_ms: float = 0.0  # over vLLM's own server's, same prompt length
    added_itl_p50_ms: float = 0.0


def _summary(prompt_tokens: int, path: str, results: list[RequestResult]) -> PathLatency:
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{path}, {prompt_tokens}-token prompts: {failed[0]}")
    gaps = [g for r in results for g in r.gaps_s]
    return PathLatency(
        prompt_tokens,
        path,
        statistics.median(r.ttft_s for r in results) * 1e3,
        statistics.median(gaps) * 1e3 if gaps else 0.0,
        len(results),
    )


async def _measure(urls: dict[str, str], lengths: list[int], requests: int, max_tokens: int, vocab: int, seed: int) -> list[PathLatency]:
    rng = random.Random(seed)
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        models = {path: await served_model(url) for path, url in urls.items()}
        for length in [lengths[0], *lengths]:  # the first round warms every path up and is dropped
            results: dict[str, list[RequestResult]] = {path: [] for path in urls}
            for i in range(requests):
                order = list(urls) if i % 2 == 0 else list(reversed(urls))  # neither path always goes first
                for path in order:
                    prompt = [rng.randrange(10, vocab) for _ in range(length)]
                    results[path].append(await stream_request(session, urls[path], models[path], prompt, max_tokens, ""))
            rows.append([_summary(length, path, results[path]) for path in urls])
    measured = []
    for row in rows[1:]:
        vllm = row[0]
        for r in row:
            r.added_ttft_p50_ms, r.added_itl_p50_ms = r.ttft_p50_ms - vllm.ttft_p50_ms, r.itl_p50_ms - vllm.itl_p50_ms
        measured += row
    return measured


def main(
    lengths: list[int],
    requests: int,
    max_tokens: int,
    model: str = "",
    json_output: bool = False,
    seed: int = 0,
    kv_transport: str = "auto",
    pin_workers: bool = False,
) -> int:
    from transformers import AutoTokenizer

    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    model = model or str(ensure_tiny_model())
    engine = EngineConfig(model=model, max_model_len=max(lengths) + max_tokens + 16)
    cores = set(range(os.cpu_count() or 1))
    vocab = len(AutoTokenizer.from_pretrained(model))
    log_dir = tempfile.mkdtemp(prefix="pdcluster-bench-latency-")
    started = []
    try:
        colocated, vllm_url = start_colocated(engine, cores, log_dir)
        started.append(colocated)
        processes, disaggregated_url = start_pdcluster(
            engine,
            [(Role.PREFILL, {0}), (Role.DECODE, {1})] if pin_workers else [(Role.PREFILL, cores), (Role.DECODE, cores)],
            log_dir,
            ROUTER_PATH_FLAGS["disaggregated"],
            kv_transport,
        )
        started += processes
        workers = [p for p in processes if p.role != "router"]
        bypass_router = start_router(model, workers, ROUTER_PATH_FLAGS["bypass"], log_dir)
        started.append(bypass_router)
        urls = {"vllm": vllm_url, "disaggregated": disaggregated_url, "bypass": wait_ready(bypass_router).router.http}
        measured = asyncio.run(_measure(urls, lengths, requests, max_tokens, vocab, seed))
    finally:
        stop_all(started)
    print(
        f"one request at a time, {max_tokens} output tokens, {requests} requests per path and length, KV over {kv_transport},"
        f" workers {'on a core each' if pin_workers else 'on every core'};"
        " ceiling = vLLM's own server"
    )
    print(f"{'prompt':>7} {'path':>14} {'TTFT p50 ms':>12} {'added':>8} {'ratio':>6} {'ITL p50 ms':>11} {'added':>7}")
    for r in measured:
        vllm_ttft = r.ttft_p50_ms - r.added_ttft_p50_ms
        print(
            f"{r.prompt_tokens:>7} {r.path:>14} {r.ttft_p50_ms:>12.1f} {r.added_ttft_p50_ms:>+8.1f} {r.ttft_p50_ms / vllm_ttft:>6.2f}"
            f" {r.itl_p50_ms:>11.2f} {r.added_itl_p50_ms:>+7.2f}"
        )
    if json_output:
        print(json.dumps([asdict(r) for r in measured]))
    return 0
