"""`pdcluster bench serve`: an open-loop load generator for any OpenAI-compatible URL.

Requests arrive as a seeded Poisson process at each rate of a sweep, whatever the server's
progress (open loop, as production traffic does). Prompts are token-id lists drawn from the
tokenizer's vocabulary with lengths from a seeded distribution; in prefix-sharing mode
every prompt starts with one of a few shared prefixes. Each request streams
(`/v1/completions`, `ignore_eos` so outputs have the asked length); per rate it reports
p50/p90/p99 of TTFT, ITL (every gap between consecutive streamed chunks, as vLLM's
benchmark counts it), TPOT (each request's mean time per output token after the first)
and end-to-end latency, throughput (req/s, output tok/s) and goodput: the share of
requests within the TTFT SLO whose TPOT is within the ITL SLO.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace

import aiohttp

from pdcluster.bench.percentiles import percentile
from pdcluster.bench.rate_plot import plot_grid
from pdcluster.bench.workloads import Workload

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    tpot_s: float = 0.0  # mean time per output token after the first
    gaps_s: list[float] = field(default_factory=list)  # between consecutive streamed chunks
    e2e_s: float = 0.0
    output_tokens: int = 0
    error: str = ""


@dataclass
class RateResult:
    rate: float
    requests: int
    completed: int
    failed: int
    duration_s: float
    req_per_s: float
    output_tok_per_s: float
    ttft_ms: dict = field(default_factory=dict)
    itl_ms: dict = field(default_factory=dict)
    tpot_ms: dict = field(default_factory=dict)
    e2e_ms: dict = field(default_factory=dict)
    goodput: float = 0.0  # share of all requests that completed within both SLOs
    goodput_req_per_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": round(percentile(values, p / 100) * 1e3, 2) for p in PERCENTILES}


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int, api_key: str) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as response:
            if response.status != 200:
                return RequestResult(False, error=f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return RequestResult(False, error=event["error"].get("message", "error"))
                if event.get("choices"):
                    now = time.perf_counter()
                    first = first or now
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except aiohttp.ClientError as e:
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    first = first or end
    tpot = (end - first) / (tokens - 1) if tokens > 1 else 0.0
    return RequestResult(True, first - start, tpot, gaps, end - start, tokens)


async def run_rate(
    url: str,
    model: str,
    rate: float,
    workload: list[tuple[list[int], int]],
    seed: int,
    slo_ttft_ms: float,
    slo_itl_ms: float,
    api_key: str = "",
    progress=None,
) -> RateResult:
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks = []
        arrival = 0.0
        for prompt, max_tokens in workload:
            arrival += rng.expovariate(rate)
            delay = start + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(session, url, model, prompt, max_tokens, api_key))
            if progress is not None:
                task.add_done_callback(lambda _: progress.update(1))
            tasks.append(task)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    done = [r for r in results if r.ok]
    good = [r for r in done if r.ttft_s * 1e3 <= slo_ttft_ms and r.tpot_s * 1e3 <= slo_itl_ms]
    return RateResult(
        rate=rate,
        requests=len(results),
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=round(duration, 3),
        req_per_s=round(len(done) / duration, 3),
        output_tok_per_s=round(sum(r.output_tokens for r in done) / duration, 1),
        ttft_ms=_percentiles([r.ttft_s for r in done]),
        itl_ms=_percentiles([g for r in done for g in r.gaps_s]),
        tpot_ms=_percentiles([r.tpot_s for r in done]),
        e2e_ms=_percentiles([r.e2e_s for r in done]),
        goodput=round(len(good) / len(results), 4),
        goodput_req_per_s=round(len(good) / duration, 3),
        errors=sorted({r.error for r in results if not r.ok})[:5],
    )


def plot(results: list[RateResult], path: str, title: str) -> None:
    rates = [r.rate for r in results]
    panels = [
        (label, f"{label} (ms)", {f"p{p}": (rates, [getattr(r, metric)[f"p{p}"] for r in results]) for p in PERCENTILES})
        for metric, label in (
            ("ttft_ms", "TTFT"),
            ("itl_ms", "ITL (between chunks)"),
            ("tpot_ms", "TPOT (per request)"),
            ("e2e_ms", "end-to-end"),
        )
    ]
    plot_grid([panels], path, title)


def sweep(
    url: str,
    model: str,
    rates: list[float],
    requests: int,
    workload: Workload,
    vocab: int,
    slo_ttft_ms: float,
    slo_itl_ms: float,
    api_key: str = "",
    quiet: bool = False,
) -> list[RateResult]:
    """One open-loop run per rate; rate i draws its requests and arrivals from seed + i, so
    any server given the same arguments gets the same load."""
    from tqdm import tqdm

    results = []
    for i, rate in enumerate(rates):
        batch = replace(workload, seed=workload.seed + i).requests(requests, vocab)
        with tqdm(total=requests, desc=f"{rate:g} req/s", disable=quiet, leave=False) as bar:
            results.append(asyncio.run(run_rate(url, model, rate, batch, workload.seed + i, slo_ttft_ms, slo_itl_ms, api_key, bar)))
    return results


async def served_model(url: str, api_key: str = "") -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models", headers=headers) as response:
        return (await response.json())["data"][0]["id"]


def main(
    url: str,
    rates: list[float],
    requests: int,
    workload: Workload,
    tokenizer: str = "",
    model: str = "",
    slo_ttft_ms: float = 1000.0,
    slo_itl_ms: float = 100.0,
    json_path: str = "",
    plot_path: str = "",
    api_key: str = "",
    quiet: bool = False,
) -> list[RateResult]:
    from transformers import AutoTokenizer

    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    url = url.rstrip("/").removesuffix("/v1")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer or str(ensure_tiny_model())))
    model = model or asyncio.run(served_model(url, api_key))
    results = sweep(url, model, rates, requests, workload, vocab, slo_ttft_ms, slo_itl_ms, api_key, quiet)
    report = {
        "url": url,
        "model": model,
        "workload": asdict(workload),
        "slo": {"ttft_ms": slo_ttft_ms, "itl_ms": slo_itl_ms},
        "results": [asdict(r) for r in results],
    }
    if not quiet:
        print(
            f"{'rate':>6} {'done':>5} {'req/s':>7} {'tok/s':>8} {'TTFT p50/p90/p99 ms':>24} {'ITL p50/p90/p99 ms':>22} "
            f"{'TPOT p50/p99 ms':>16} {'e2e p50/p99 ms':>18} {'goodput':>8}"
        )
        for r in results:

            def f(d, keys=("p50", "p90", "p99")):
                return "/".join("-" if d[k] is None else f"{d[k]:.0f}" for k in keys)

            print(
                f"{r.rate:>6g} {r.completed:>5} {r.req_per_s:>7.2f} {r.output_tok_per_s:>8.1f} {f(r.ttft_ms):>24} "
                f"{f(r.itl_ms):>22} {f(r.tpot_ms, ('p50', 'p99')):>16} {f(r.e2e_ms, ('p50', 'p99')):>18} {r.goodput:>8.2%}"
            )
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=1)
    if plot_path:
        plot(results, plot_path, f"{model} @ {url}: {workload.prompt_tokens} prompt / {workload.output_tokens} output tokens")
    return results
