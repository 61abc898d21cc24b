"""`pdcluster bench router --prompt-tokens N ...`: what the router adds to long prompts, against
vLLM's own server on the same prompts.

The same text prompts (1K to 100K+ tokens, cut from the tiny model's corpus) go one at a time
to (a) vLLM's own OpenAI server, the ceiling, and (b) pdcluster's router in front of one decode
worker that computes every prompt itself (the same engine arguments: what differs is the front
door, which tokenizes the text, and the hop to the worker), and, with `disaggregated`, (c) the
router in front of a prefill and a decode worker (the whole path: chunked prefill, layer-wise
transfer). Each asks for one output token, so latency is TTFT. Reported per length: p50
latency of each, their ratio, and the front process's CPU time per request (vLLM's API server
process, the engine core apart; pdcluster's router)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import httpx
import psutil

from pdcluster.bench.compare_bench import start_colocated
from pdcluster.common.processes import LocalProcess, stop_all
from pdcluster.common.tiny_model.generate import CORPUS, LONG_MODEL, ensure_tiny_model
from pdcluster.common.worker_record import Role
from pdcluster.planner.local_cluster import start_pdcluster
from pdcluster.worker.config import EngineConfig

MAX_MODEL_LEN = 131072


@dataclass
class FrontDoor:
    p50_ms: float
    cpu_ms_per_request: float  # the front process's own CPU (user + system)
    prompt_tokens: int  # as the server counted them


@dataclass
class LengthRow:
    prompt_tokens: int
    requests: int
    vllm: FrontDoor  # the ceiling
    router: FrontDoor
    disaggregated: FrontDoor | None

    @property
    def ratio(self) -> float:
        return self.router.p50_ms / self.vllm.p50_ms


def text_of_tokens(tokenizer, n: int, salt: int) -> str:
    """About `n` tokens of corpus text, starting at a different place for each `salt` (so no
    prompt is another's cached prefix)."""
    ids = tokenizer(CORPUS.read_text()).input_ids
    start = (salt * 7919) % len(ids)
    rotated = ids[start:] + ids[:start]
    return tokenizer.decode((rotated * (n // len(ids) + 1))[:n])


def _measure(url: str, model: str, front_pid: int, prompts: list[str]) -> FrontDoor:
    front = psutil.Process(front_pid)
    latencies, counted = [], []
    with httpx.Client(base_url=url, timeout=3600) as http:
        before = sum(front.cpu_times()[:2])
        for prompt in prompts:
            start = time.perf_counter()
            response = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            counted.append(response.json()["usage"]["prompt_tokens"])
        cpu_ms = (sum(front.cpu_times()[:2]) - before) * 1e3 / len(prompts)
    return FrontDoor(round(statistics.median(latencies) * 1e3, 1), round(cpu_ms, 1), round(statistics.mean(counted)))


def _run(system: str, start, lengths: list[int], prompts: dict[int, list[str]], warm: str, model: str) -> dict[int, FrontDoor]:
    """Start a system (returns its processes, URL and front process), measure each length, stop it."""
    processes, url, front = start()
    try:
        with httpx.Client(base_url=url, timeout=3600) as http:  # the first request's one-time costs
            http.post("/v1/completions", json={"model": model, "prompt": warm, "max_tokens": 1}).raise_for_status()
        print(f"  {system}: ready, measuring", flush=True)
        return {n: _measure(url, model, front.process.pid, prompts[n]) for n in lengths}
    finally:
        stop_all(processes)


def main(lengths: list[int], requests: int = 3, json_output: bool = False, disaggregated: bool = False) -> int:
    from transformers import AutoTokenizer

    model = str(ensure_tiny_model(spec=LONG_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = {n: [text_of_tokens(tokenizer, n, salt) for salt in range(requests)] for n in lengths}
    warm = text_of_tokens(tokenizer, 256, requests)
    # float32 as the model is; eager on both sides: compiling is not what differs.
    engine = EngineConfig(model=model, kv_cache_gib=2, dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    cores = sorted(os.sched_getaffinity(0))
    log_dir = tempfile.mkdtemp(prefix="pdcluster-bench-router-long-")
    router_flags = ["--max-model-len", str(MAX_MODEL_LEN)]

    def vllm_server():
        server, url = start_colocated(engine, set(cores), log_dir)
        return [server], url, server

    def pdcluster(workers_on, flags):
        def start():
            processes, url = start_pdcluster(engine, workers_on, log_dir, [*router_flags, *flags])
            router: LocalProcess = processes[-1]
            return processes, url, router

        return start

    print(f"long prompts, {requests} each, one at a time, 1 output token; model {LONG_MODEL.cache_name}; logs in {log_dir}", flush=True)
    vllm = _run("vLLM's own server", vllm_server, lengths, prompts, warm, model)
    # Every prompt computed by the decode worker itself: the same engine work as vLLM's server.
    alone = _run(
        "pdcluster router + 1 decode worker",
        pdcluster([(Role.DECODE, set(cores))], ["--bypass-prefill-below", "1000000000"]),
        lengths,
        prompts,
        warm,
        model,
    )
    split = None
    if disaggregated:
        halves = [(Role.PREFILL, set(cores[: len(cores) // 2])), (Role.DECODE, set(cores[len(cores) // 2 :]))]
        split = _run("pdcluster 1P+1D", pdcluster(halves, ["--bypass-prefill-below", "0"]), lengths, prompts, warm, model)
    rows = [LengthRow(n, requests, vllm[n], alone[n], split[n] if split else None) for n in lengths]
    print(
        f"{'tokens':>7} {'vLLM p50 ms':>12} {'router p50 ms':>14} {'ratio':>6} {'vLLM cpu ms/req':>16} {'router cpu ms/req':>18} {'1P+1D p50 ms':>13}"
    )
    for r in rows:
        print(
            f"{r.prompt_tokens:>7} {r.vllm.p50_ms:>12.1f} {r.router.p50_ms:>14.1f} {r.ratio:>6.3f} {r.vllm.cpu_ms_per_request:>16.1f} "
            f"{r.router.cpu_ms_per_request:>18.1f} {(r.disaggregated.p50_ms if r.disaggregated else float('nan')):>13.1f}"
        )
    if json_output:
        print(json.dumps([{**asdict(r), "ratio": round(r.ratio, 4)} for r in rows]))
    return 0
