"""`pdcluster bench serve`: an open-loop load generator for any OpenAI-compatible URL.

Requests arrive as a seeded Poisson process at each rate of a sweep, whatever the server's
progress (open loop, as production traffic does). Prompts are token-id lists drawn from the
tokenizer's vocabulary with lengths from a seeded distribution; in prefix-sharing mode
every prompt starts with one of a few shared prefixes. Each request streams
(`/v1/completions`, `ignore_eos` so outputs have the asked length); per rate it reports
p50/p90/p99 of TTFT, ITL (every gap between consecutive streamed chunks, as vLLM's
benchmark counts it), TPOT (each request's mean time per output token after the first)
and end-to-end latency, throughput (req/s, output tok/s) and SLO attainment: the share of
requests within the TTFT SLO whose TPOT is within the ITL SLO (goodput, as DistServe defines
it, is the highest rate at which that share is at least 90%).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import aiohttp

from pdcluster.bench.rate_plot import plot_grid
from pdcluster.common.openai_stream import served_model, stream_request
from pdcluster.common.percentiles import PERCENTILES, format_ms, percentiles_ms
from pdcluster.planner.workloads import RequestShape, Workload


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
    slo_attainment: float = 0.0  # share of all requests that completed within both SLOs
    goodput_req_per_s: float = 0.0  # those requests per second
    # Requests outside the SLOs, by which they missed: ttft, tpot, both, or failed.
    slo_misses: dict = field(default_factory=dict)
    prefix_cache_hit_rate: float | None = None  # cached prompt tokens / prompt tokens, where the server says
    # The server's cost over this run (--cost-per-hour) divided by the input or output tokens served.
    cost_usd_per_million_tokens: dict = field(default_factory=dict)
    # What the server's own counters (`counters` of `replay`) moved by over this run.
    server_counters: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Per tenant of a mixed run (--tenant): these figures over its requests, its share of the
    # tokens served, and that share of the cost.
    tenants: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchTenant:
    """One of the callers a run mixes (`--tenant NAME:KEY:WEIGHT[:MODEL]`): its API key, its
    share of the arrivals, and the model it asks for ("": the run's)."""

    name: str
    api_key: str
    weight: float = 1.0
    model: str = ""

    @classmethod
    def parse(cls, text: str) -> BenchTenant:
        parts = text.split(":")
        if len(parts) not in (3, 4) or not parts[0] or not parts[1]:
            raise ValueError(f"--tenant takes NAME:KEY:WEIGHT[:MODEL], not {text!r}")
        weight = float(parts[2])
        if weight <= 0:
            raise ValueError(f"--tenant {parts[0]}: the weight must be positive")
        return cls(parts[0], parts[1], weight, parts[3] if len(parts) == 4 else "")


def assign_tenants(tenants: list[BenchTenant], count: int, seed: int) -> list[BenchTenant]:
    """Each request's tenant, drawn by weight from `seed`: the same mix for every server."""
    return random.Random(seed).choices(tenants, weights=[t.weight for t in tenants], k=count)


async def run_rate(
    url: str,
    model: str,
    rate: float,
    requests: list[RequestShape],
    vocab: int,
    slo_ttft_ms: float,
    slo_itl_ms: float,
    api_key: str = "",
    progress=None,
    cost_per_hour: float = 0.0,
    tenants: list[BenchTenant] | None = None,
) -> RateResult:
    """Sends each request at its arrival time (open loop), whatever the server's progress;
    `tenants`: each request's caller (None: one caller with `api_key`)."""
    callers = tenants or [BenchTenant("", api_key)] * len(requests)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks = []
        for request, caller in zip(requests, callers, strict=True):
            prompt = request.prompt_tokens(vocab)
            delay = start + request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(stream_request(session, url, caller.model or model, prompt, request.output_tokens, caller.api_key))
            if progress is not None:
                task.add_done_callback(lambda _: progress.update(1))
            tasks.append(task)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = _summary(rate, results, duration, slo_ttft_ms, slo_itl_ms, cost_per_hour)
    if tenants:
        all_tokens = sum(r.prompt_tokens + r.output_tokens for r in results if r.ok)
        for name in dict.fromkeys(t.name for t in callers):
            mine = [r for r, caller in zip(results, callers, strict=True) if caller.name == name]
            tokens = sum(r.prompt_tokens + r.output_tokens for r in mine if r.ok)
            figures = asdict(
                _summary(rate, mine, duration, slo_ttft_ms, slo_itl_ms, cost_per_hour * tokens / all_tokens if all_tokens else 0)
            )
            # Its share of the tokens the cluster served, and that share of the run's cost.
            figures["share"] = round(tokens / all_tokens, 4) if all_tokens else 0.0
            figures["cost_usd"] = round(cost_per_hour * duration / 3600 * figures["share"], 6)
            summary.tenants[name] = {k: v for k, v in figures.items() if k not in ("tenants", "server_counters")}
    return summary


def _summary(rate: float, results: list, duration: float, slo_ttft_ms: float, slo_itl_ms: float, cost_per_hour: float) -> RateResult:
    """`results`' figures over a run of `duration` s; `cost_per_hour`: what they cost (their share)."""
    done = [r for r in results if r.ok]
    late = [(r.ttft_s * 1e3 > slo_ttft_ms, r.tpot_s * 1e3 > slo_itl_ms) for r in done]
    good = [r for r, (slow_first, slow_rest) in zip(done, late, strict=True) if not (slow_first or slow_rest)]
    cost = cost_per_hour * duration / 3600
    reported = [r for r in done if r.cached_tokens is not None]
    return RateResult(
        rate=rate,
        requests=len(results),
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=round(duration, 3),
        req_per_s=round(len(done) / duration, 3),
        output_tok_per_s=round(sum(r.output_tokens for r in done) / duration, 1),
        ttft_ms=percentiles_ms([r.ttft_s for r in done]),
        itl_ms=percentiles_ms([g for r in done for g in r.gaps_s]),
        tpot_ms=percentiles_ms([r.tpot_s for r in done]),
        e2e_ms=percentiles_ms([r.e2e_s for r in done]),
        slo_attainment=round(len(good) / len(results), 4) if results else 0.0,
        goodput_req_per_s=round(len(good) / duration, 3),
        prefix_cache_hit_rate=round(sum(r.cached_tokens for r in reported) / sum(r.prompt_tokens for r in reported), 4)
        if reported
        else None,
        cost_usd_per_million_tokens=cost_per_million(cost, sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)),
        slo_misses={
            "ttft": late.count((True, False)),
            "tpot": late.count((False, True)),
            "both": late.count((True, True)),
            "failed": len(results) - len(done),
        },
        errors=sorted({r.error for r in results if not r.ok})[:5],
    )


GOODPUT_ATTAINMENT = 0.9  # DistServe's: goodput is the highest rate with 90% of requests within both SLOs


def goodput_rate(results: list[RateResult]) -> float:
    """DistServe's goodput over a sweep: the highest rate at which, as at every lower rate swept,
    at least 90% of requests met both SLOs (0 if the lowest rate misses)."""
    best = 0.0
    for r in sorted(results, key=lambda r: r.rate):
        if r.slo_attainment < GOODPUT_ATTAINMENT:
            break
        best = r.rate
    return best


def cost_per_million(cost_usd: float, input_tokens: int, output_tokens: int) -> dict:
    """The whole cost over the tokens of each kind, per million (None without tokens or cost)."""
    return {
        kind: round(cost_usd / tokens * 1e6, 6) if tokens and cost_usd else None
        for kind, tokens in (("input", input_tokens), ("output", output_tokens))
    }


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
    cost_per_hour: float = 0.0,
    counters: Callable[[], dict[str, float]] | None = None,
    tenants: list[BenchTenant] | None = None,
) -> list[RateResult]:
    """One open-loop run per rate; rate i draws its requests, arrivals and callers from seed +
    i, so any server given the same arguments gets the same load (and `pdcluster simulate` too)."""
    return [
        replay(
            url,
            model,
            rate,
            replace(workload, seed=workload.seed + i).shapes(requests, rate),
            vocab,
            slo_ttft_ms,
            slo_itl_ms,
            api_key,
            quiet=quiet,
            cost_per_hour=cost_per_hour,
            counters=counters,
            tenants=assign_tenants(tenants, requests, workload.seed + i) if tenants else None,
        )
        for i, rate in enumerate(rates)
    ]


def replay(
    url: str,
    model: str,
    rate: float,
    requests: list[RequestShape],
    *args: Any,
    quiet: bool = False,
    counters: Callable[[], dict[str, float]] | None = None,
    **kwargs,
) -> RateResult:
    """`run_rate` (same arguments) from synchronous code, with a progress bar unless quiet;
    with `counters` (the server's, read before and after), their increase over the run."""
    from tqdm import tqdm

    before = counters() if counters else {}
    with tqdm(total=len(requests), desc=f"{rate:g} req/s", disable=quiet, leave=False) as bar:
        result = asyncio.run(run_rate(url, model, rate, requests, *args, **{**kwargs, "progress": bar}))
    if counters:
        result.server_counters = {k: round(v - before.get(k, 0.0), 4) for k, v in counters().items() if v != before.get(k, 0.0)}
    return result


def prometheus_counters(url: str, prefixes: tuple[str, ...]) -> dict[str, float]:
    """The server's Prometheus series (`/metrics`) whose names start with one of `prefixes`,
    keyed `name{labels}`."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefixes) and not sample.name.endswith("_created"):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


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
    trace: list[RequestShape] | None = None,
    cost_per_hour: float = 0.0,
    tenants: list[BenchTenant] | None = None,
) -> list[RateResult]:
    """A sweep of `workload` over `rates`, or, given a `trace`, one replay of it; `tenants`:
    the callers to mix, by weight (None: one, with `api_key`)."""
    from transformers import AutoTokenizer

    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    url = url.rstrip("/").removesuffix("/v1")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer or str(ensure_tiny_model())))
    model = model or asyncio.run(served_model(url, api_key or (tenants[0].api_key if tenants else "")))
    if trace:
        span = trace[-1].arrival_s - trace[0].arrival_s
        rate = round(len(trace) / span, 3) if span > 0 else float(len(trace))
        callers = assign_tenants(tenants, len(trace), workload.seed) if tenants else None
        results = [
            replay(
                url, model, rate, trace, vocab, slo_ttft_ms, slo_itl_ms, api_key, quiet=quiet, cost_per_hour=cost_per_hour, tenants=callers
            )
        ]
    else:
        results = sweep(
            url, model, rates, requests, workload, vocab, slo_ttft_ms, slo_itl_ms, api_key, quiet, cost_per_hour, tenants=tenants
        )
    report = {
        "url": url,
        "model": model,
        "workload": "trace" if trace else asdict(workload),
        "slo": {"ttft_ms": slo_ttft_ms, "itl_ms": slo_itl_ms},
        "cost_per_hour": cost_per_hour,
        "tenants": [{"name": t.name, "weight": t.weight, "model": t.model or model} for t in tenants or ()],
        "results": [asdict(r) for r in results],
    }
    if not quiet:
        print_results(results)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=1)
    if plot_path:
        title = "trace replay" if trace else f"{workload.prompt_tokens} prompt / {workload.output_tokens} output tokens"
        plot(results, plot_path, f"{model} @ {url}: {title}")
    return results


def print_results(results: list[RateResult]) -> None:
    print(
        f"{'rate':>6} {'done':>5} {'req/s':>7} {'tok/s':>8} {'TTFT p50/p90/p99 ms':>24} {'ITL p50/p90/p99 ms':>22} "
        f"{'TPOT p50/p99 ms':>16} {'e2e p50/p99 ms':>18} {'in SLOs':>8} {'$/1M in/out':>16}"
    )
    for r in results:
        cost = "/".join(
            "-" if r.cost_usd_per_million_tokens.get(k) is None else f"{r.cost_usd_per_million_tokens[k]:.3f}" for k in ("input", "output")
        )
        print(
            f"{r.rate:>6g} {r.completed:>5} {r.req_per_s:>7.2f} {r.output_tok_per_s:>8.1f} {format_ms(r.ttft_ms):>24} "
            f"{format_ms(r.itl_ms):>22} {format_ms(r.tpot_ms, ('p50', 'p99')):>16} {format_ms(r.e2e_ms, ('p50', 'p99')):>18} {r.slo_attainment:>8.2%} {cost:>16}"
        )
        for name, t in r.tenants.items():  # a mixed run: each tenant's own figures, its share and cost
            print(
                f"{'':>6} {t['completed']:>5} {t['req_per_s']:>7.2f} {t['output_tok_per_s']:>8.1f} {format_ms(t['ttft_ms']):>24} "
                f"{format_ms(t['itl_ms']):>22} {format_ms(t['tpot_ms'], ('p50', 'p99')):>16} {format_ms(t['e2e_ms'], ('p50', 'p99')):>18} "
                f"{t['slo_attainment']:>8.2%}  tenant {name}: {t['share']:.1%} of tokens, ${t['cost_usd']:.4f}"
            )
