"""`pdcluster bench router`: what the router adds on top of calling a worker directly.

One decode worker serves every request; the same pre-tokenized prompts go (a) straight to
its `Worker.Decode` RPC — the ceiling — and (b) through a router (OpenAI HTTP and gRPC
`Inference`) configured to send every prompt to that worker alone, at the same
concurrency. Reported per concurrency: p50/p99 request latency of each path, the latency
the router adds, requests/s, and the router's CPU time per request (router pinned to one
core), which bounds the requests/s one router core sustains.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass

import aiohttp
import grpc
import psutil
from vllm import SamplingParams

from pdcluster.common.cluster_token import local_cluster_token
from pdcluster.common.percentiles import percentile
from pdcluster.common.processes import start_process, stop_all, wait_ready
from pdcluster.common.sample_wire import encode_sampling_params
from pdcluster.common.worker_auth import token_metadata
from pdcluster.common.worker_record import Role, RouterRecord
from pdcluster.protos import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

PROMPT_TOKENS = 32
OUTPUT_TOKENS = 8


@dataclass
class PathResult:
    p50_ms: float
    p99_ms: float
    req_per_s: float


@dataclass
class Row:
    concurrency: int
    requests: int
    direct: PathResult  # the ceiling: Worker.Decode on the same worker
    router_http: PathResult
    router_grpc: PathResult
    added_p50_ms: float  # router_http - direct
    added_p99_ms: float
    router_cpu_ms_per_request: float  # over both router paths

    @property
    def router_core_req_per_s(self) -> float:
        return 1000.0 / self.router_cpu_ms_per_request if self.router_cpu_ms_per_request else float("inf")


async def _run(call, prompts: list[list[int]], concurrency: int) -> PathResult:
    latencies: list[float] = []
    queue = list(prompts)

    async def client() -> None:
        while queue:
            prompt = queue.pop()
            start = time.perf_counter()
            await call(prompt)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return PathResult(percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3, len(prompts) / elapsed)


def _sampling() -> dict:
    return dict(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)


async def _measure(decode_address: str, router: RouterRecord, router_pid: int, concurrency: int, requests: int, vocab: int) -> Row:
    prompts = [[(i * 7 + j * 13) % (vocab - 10) + 5 for j in range(PROMPT_TOKENS)] for i in range(requests)]
    async with (
        grpc.aio.insecure_channel(decode_address) as wc,
        grpc.aio.insecure_channel(router.grpc) as rc,
        aiohttp.ClientSession(router.http, connector=aiohttp.TCPConnector(limit=concurrency)) as http,
    ):
        worker = worker_pb2_grpc.WorkerStub(wc)
        token = token_metadata(local_cluster_token("pdcluster"))  # what the hand-started worker and router share
        inference = inference_pb2_grpc.InferenceStub(rc)

        params = encode_sampling_params(SamplingParams(**_sampling()))

        async def direct(prompt):
            request = worker_pb2.DecodeRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, sampling_params=params)
            async for _ in worker.Decode(request, metadata=token):
                pass

        async def via_http(prompt):
            async with http.post("/v1/completions", json={"prompt": prompt, **_sampling()}) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"router answered {response.status}: {body[:500]!r}")

        async def via_grpc(prompt):
            await inference.Complete(inference_pb2.GenerateRequest(prompt_token_ids=prompt, **_sampling()))

        await _run(direct, prompts[: concurrency * 2], concurrency)  # warm up every path
        await _run(via_http, prompts[: concurrency * 2], concurrency)
        direct_result = await _run(direct, prompts, concurrency)
        cpu = psutil.Process(router_pid)
        before = sum(cpu.cpu_times()[:2])
        http_result = await _run(via_http, prompts, concurrency)
        grpc_result = await _run(via_grpc, prompts, concurrency)
        cpu_ms = (sum(cpu.cpu_times()[:2]) - before) * 1e3 / (2 * requests)
    return Row(
        concurrency,
        requests,
        direct_result,
        http_result,
        grpc_result,
        http_result.p50_ms - direct_result.p50_ms,
        http_result.p99_ms - direct_result.p99_ms,
        cpu_ms,
    )


def main(json_output: bool = False, concurrency=(1, 8, 32), requests: int = 200, model: str = "") -> int:
    from transformers import AutoTokenizer

    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    model_args = ["--model", model] if model else []
    vocab = len(AutoTokenizer.from_pretrained(model or str(ensure_tiny_model())))
    decode = start_process(Role.DECODE, model_args)
    router = None
    try:
        wait_ready(decode)
        # Every prompt bypasses remote prefill: both paths do the same work on the same worker.
        router = wait_ready(
            start_process(
                "router", ["--port", "0", "--grpc-port", "0", "--worker", decode.address, "--bypass-prefill-below", "1000000", *model_args]
            )
        )
        os.sched_setaffinity(router.process.pid, {0})
        rows = [asyncio.run(_measure(decode.address, router.router, router.process.pid, c, requests, vocab)) for c in concurrency]
    finally:
        stop_all([router, decode])
    print(
        f"router overhead: {PROMPT_TOKENS}-token prompts, {OUTPUT_TOKENS} output tokens, router pinned to one core; "
        "ceiling = Worker.Decode called directly"
    )
    print(
        f"{'conc':>4} {'direct p50/p99 ms':>18} {'http p50/p99 ms':>16} {'grpc p50/p99 ms':>16} {'added p50/p99 ms':>17} "
        f"{'direct req/s':>12} {'http req/s':>10} {'ratio':>6} {'router cpu ms/req':>17} {'req/s/core':>10}"
    )
    for r in rows:
        print(
            f"{r.concurrency:>4} {r.direct.p50_ms:>8.1f}/{r.direct.p99_ms:<9.1f} {r.router_http.p50_ms:>7.1f}/{r.router_http.p99_ms:<8.1f} "
            f"{r.router_grpc.p50_ms:>7.1f}/{r.router_grpc.p99_ms:<8.1f} {r.added_p50_ms:>8.1f}/{r.added_p99_ms:<8.1f} "
            f"{r.direct.req_per_s:>12.1f} {r.router_http.req_per_s:>10.1f} {r.router_http.req_per_s / r.direct.req_per_s:>6.2f} "
            f"{r.router_cpu_ms_per_request:>17.2f} {r.router_core_req_per_s:>10.0f}"
        )
    if json_output:
        print(json.dumps([{**asdict(r), "router_core_req_per_s": r.router_core_req_per_s} for r in rows]))
    return 0
