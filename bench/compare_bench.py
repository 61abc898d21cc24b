"""`pdcluster bench compare`: disaggregated 1P+1D against co-located vLLM, same cores, one run.

(a) co-located: vLLM's own OpenAI server, one engine on all the given cores, prefill and
decode sharing its steps; (b) pdcluster: one prefill and one decode worker, each pinned to
half of the cores, behind the router, which places each prompt by the workers' profile
against the same SLOs the benchmark counts. Both run the same model and engine settings and
get the same seeded open-loop sweep of request rates (`bench serve`) for each workload. Per
workload and rate it prints p99 ITL, TPOT and TTFT and SLO attainment of both and the ratios
(b)/(a); per workload, each system's goodput (DistServe's: the highest rate with 90% of
requests within both SLOs) and the issue's goals. It can write the JSON and a plot.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from pdcluster.bench.rate_plot import plot_grid
from pdcluster.bench.serve_bench import RateResult, goodput_rate, prometheus_counters, replay, run_rate, sweep
from pdcluster.common.openai_stream import served_model
from pdcluster.common.processes import LocalProcess, stop_all
from pdcluster.common.vllm_args import PDCLUSTER_DEFAULTS, engine_args_from_flags, engine_flags
from pdcluster.common.vllm_server import start_vllm_server
from pdcluster.common.worker_record import Role
from pdcluster.planner.local_cluster import engine_env, start_pdcluster
from pdcluster.planner.workloads import COMPARE_RATES, COMPARE_WORKLOADS, RequestShape, Workload
from pdcluster.worker.config import EngineConfig

SYSTEMS = ("colocated", "pdcluster")
LATENCIES = {"itl_ms": "ITL", "tpot_ms": "TPOT", "ttft_ms": "TTFT"}  # compared at p99
WARMUP_REQUESTS = 4
NOISE_REQUESTS = 2  # attainment below co-located's by this many requests or fewer is noise
PROFILES_DIR = os.path.join(os.path.dirname(__file__), "profiles")
ROUTER_COUNTERS = (
    "pdcluster_router_placements",
    "pdcluster_router_ttft_prediction_ratio_sum",
    "pdcluster_router_ttft_prediction_ratio_count",
)


@dataclass
class Comparison:
    workload: str
    rate: float
    colocated: RateResult
    pdcluster: RateResult

    def ratio(self, metric: str) -> float | None:
        a, b = (_value(r, metric) for r in (self.colocated, self.pdcluster))
        return round(b / a, 3) if a and b is not None else None


def _value(result: RateResult, metric: str) -> float | None:
    return result.slo_attainment if metric == "slo_attainment" else getattr(result, metric)["p99"]


def goodput_rates(comparisons: list[Comparison]) -> dict[str, float]:
    """Each system's goodput over one workload's sweep."""
    return {s: goodput_rate([getattr(c, s) for c in comparisons]) for s in SYSTEMS}


def goals(workload: str, comparisons: list[Comparison]) -> dict:
    """The goals for one workload's sweep: each one's figure and whether it is met."""
    rates = goodput_rates(comparisons)
    ratio = round(rates["pdcluster"] / rates["colocated"], 3) if rates["colocated"] else None
    below = [
        c.rate
        for c in comparisons
        if (c.colocated.slo_attainment - c.pdcluster.slo_attainment) * c.pdcluster.requests > NOISE_REQUESTS + 1e-9
    ]
    out = {
        "attainment_never_below_colocated": {"rates_below": below, "met": not below},
        "goodput_rate_ratio": {"value": ratio, "goal": 1.0, "met": _at_least(ratio, rates, 1.0)},
    }
    if workload == "prefill-heavy":
        out["goodput_rate_ratio_prefill_heavy"] = {"value": ratio, "goal": 1.5, "met": _at_least(ratio, rates, 1.5)}
        itl = [c.ratio("itl_ms") for c in comparisons]
        out["p99_itl_ratio"] = {"values": itl, "goal": 0.5, "met": all(r is not None and r <= 0.5 for r in itl)}
    return out


def _at_least(ratio: float | None, rates: dict, goal: float) -> bool:
    if ratio is not None:
        return ratio >= goal
    # Co-located never reaches 90%: any pdcluster goodput beats it; none ties it, which only
    # "at least 1.0x" accepts.
    return rates["pdcluster"] > 0 or goal <= 1.0


def default_profile(model: str, cores_per_worker: int) -> str:
    """The measured profile of the generated bench model on this many cores, if there is one."""
    path = os.path.join(PROFILES_DIR, f"cpu{cores_per_worker}-bench-llama.json")
    return path if not model and os.path.exists(path) else ""


def start_colocated(engine: EngineConfig, cpus: set[int], log_dir: str) -> tuple[LocalProcess, str]:
    """vLLM's own OpenAI server, unmodified, on `cpus`; returns it and its base URL."""
    # pdcluster's workers' engine arguments exactly, as `vllm serve` flags.
    args = ["--model", engine.model, *engine_flags({**PDCLUSTER_DEFAULTS, **engine.vllm_args})]
    return start_vllm_server(args, engine_env(cpus, engine), os.path.join(log_dir, "colocated-vllm.log"), cpus)


def _warm_up(url: str, model_name: str, vocab: int, workload: Workload) -> None:
    """A few requests first, so no system's first-request costs land in a measured rate."""
    warm = replace(workload, seed=workload.seed + 1000).shapes(WARMUP_REQUESTS, 100.0)
    asyncio.run(run_rate(url, model_name, 100.0, warm, vocab, slo_ttft_ms=1e9, slo_itl_ms=1e9))


def _run_system(
    system: str,
    engine: EngineConfig,
    cpus: list[int],
    workloads: dict[str, Workload],
    rates: list[float],
    requests: int,
    slo_ttft_ms: float,
    slo_itl_ms: float,
    vocab: int,
    router_flags: list[str],
    cost_per_hour: float,
    trace: list[RequestShape],
) -> dict[str, list[RateResult]]:
    log_dir = tempfile.mkdtemp(prefix=f"pdcluster-compare-{system}-")
    print(f"starting {system} on cores {cpus} (logs in {log_dir})...", flush=True)
    half = len(cpus) // 2
    if system == "colocated":
        proc, url = start_colocated(engine, set(cpus), log_dir)
        processes = [proc]
    else:
        processes, url = start_pdcluster(engine, [(Role.PREFILL, set(cpus[:half])), (Role.DECODE, set(cpus[half:]))], log_dir, router_flags)
    try:
        model_name = asyncio.run(served_model(url))
        # pdcluster's router says where each rate's prompts went and how far off its predictions were.
        counters = None if system == "colocated" else lambda: prometheus_counters(url, ROUTER_COUNTERS)
        out = {}
        for name, workload in workloads.items():
            print(f"  {system} / {name}: rates {rates}, {requests} requests each", flush=True)
            _warm_up(url, model_name, vocab, workload)
            out[name] = sweep(
                url, model_name, rates, requests, workload, vocab, slo_ttft_ms, slo_itl_ms, cost_per_hour=cost_per_hour, counters=counters
            )
        if trace:
            print(f"  {system} / trace: {len(trace)} requests at {trace_rate(trace):g} req/s", flush=True)
            out["trace"] = [
                replay(
                    url,
                    model_name,
                    trace_rate(trace),
                    trace,
                    vocab,
                    slo_ttft_ms,
                    slo_itl_ms,
                    cost_per_hour=cost_per_hour,
                    counters=counters,
                )
            ]
        return out
    finally:
        stop_all(processes)


def trace_rate(trace: Sequence[RequestShape]) -> float:
    span = trace[-1].arrival_s - trace[0].arrival_s
    return round((len(trace) - 1) / span, 3) if span > 0 else float(len(trace))


def plot(comparisons: list[Comparison], path: str, title: str) -> None:
    metrics = (*((m, f"p99 {label} (ms)") for m, label in LATENCIES.items()), ("slo_attainment", "SLO attainment"))
    rows = []
    for workload in dict.fromkeys(c.workload for c in comparisons):
        chosen = [c for c in comparisons if c.workload == workload]
        rates = [c.rate for c in chosen]
        rows.append(
            [
                (f"{workload}: {label}", label, {s: (rates, [_value(getattr(c, s), metric) for c in chosen]) for s in SYSTEMS})
                for metric, label in metrics
            ]
        )
    plot_grid(rows, path, title)


def main(
    model: str = "",
    rates: tuple[float, ...] = COMPARE_RATES,
    requests: int = 40,
    workloads: tuple[str, ...] = tuple(COMPARE_WORKLOADS),
    cores: int = 0,
    slo_ttft_ms: float = 1000.0,
    slo_itl_ms: float = 20.0,
    json_path: str = "",
    plot_path: str = "",
    router_flags: Sequence[str] = (),
    cost_per_hour: float = 0.0,
    trace: Sequence[RequestShape] = (),
    vllm_flags: Sequence[str] = (),
    profile: str = "",
) -> list[Comparison]:
    from transformers import AutoTokenizer

    from pdcluster.common.tiny_model.generate import BENCH_MODEL, ensure_tiny_model

    available = sorted(os.sched_getaffinity(0))
    cpus = available[: cores or len(available)]
    if len(cpus) < 2:
        raise SystemExit("bench compare needs at least 2 cores: one for each pdcluster worker")
    # Both systems: the same engine settings, with the step size vLLM's OpenAI server uses on CPU.
    engine_args, other = engine_args_from_flags(list(vllm_flags))
    if other:
        raise SystemExit(f"bench compare takes vLLM engine flags only, not {' '.join(other)}")
    engine = EngineConfig(
        model=model or str(ensure_tiny_model(spec=BENCH_MODEL)),
        **{"dtype": "auto" if model else "float32", "kv_cache_gib": 2.0, "max_num_batched_tokens": 2048, **engine_args},
    )
    vocab = len(AutoTokenizer.from_pretrained(engine.model))
    chosen = {name: COMPARE_WORKLOADS[name] for name in workloads}
    # The router keeps the SLOs the benchmark counts, predicting from the workers' profile.
    profile = profile or default_profile(model, len(cpus) // 2)
    router_flags = [
        *(["--profile", profile] if profile else []),
        *("--slo-ttft-ms", str(slo_ttft_ms), "--slo-itl-ms", str(slo_itl_ms)),
        *router_flags,
    ]
    by_system = {
        system: _run_system(
            system,
            engine,
            cpus,
            chosen,
            list(rates),
            requests,
            slo_ttft_ms,
            slo_itl_ms,
            vocab,
            list(router_flags),
            cost_per_hour,
            list(trace),
        )
        for system in SYSTEMS
    }
    comparisons = [
        Comparison(name, rate, by_system["colocated"][name][i], by_system["pdcluster"][name][i])
        for name in chosen
        for i, rate in enumerate(rates)
    ]
    if trace:
        comparisons.append(Comparison("trace", trace_rate(trace), by_system["colocated"]["trace"][0], by_system["pdcluster"]["trace"][0]))
    by_workload = {name: [c for c in comparisons if c.workload == name] for name in dict.fromkeys(c.workload for c in comparisons)}
    _print_table(comparisons, engine, cpus, chosen, slo_ttft_ms, slo_itl_ms)
    goodput = {name: goodput_rates(rows) for name, rows in by_workload.items()}
    verdicts = {name: goals(name, rows) for name, rows in by_workload.items()}
    _print_goals(goodput, verdicts)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(
                {
                    "model": engine.model,
                    "cores": cpus,
                    "router_flags": list(router_flags),
                    "workloads": {n: asdict(w) for n, w in chosen.items()},
                    "slo": {"ttft_ms": slo_ttft_ms, "itl_ms": slo_itl_ms},
                    "cost_per_hour": cost_per_hour,
                    "comparisons": [{**asdict(c), "ratios": {m: c.ratio(m) for m in (*LATENCIES, "slo_attainment")}} for c in comparisons],
                    "goodput_rate": goodput,
                    "slo_attainment": {
                        name: {s: {str(c.rate): getattr(c, s).slo_attainment for c in rows} for s in SYSTEMS}
                        for name, rows in by_workload.items()
                    },
                    "goals": verdicts,
                },
                fh,
                indent=1,
            )
    if plot_path:
        plot(
            comparisons,
            plot_path,
            f"co-located vLLM ({len(cpus)} cores) vs pdcluster 1P+1D ({len(cpus) // 2}+{len(cpus) - len(cpus) // 2} cores); "
            f"SLO TTFT {slo_ttft_ms:g} ms, TPOT {slo_itl_ms:g} ms",
        )
    return comparisons


def _placed(result: RateResult) -> str:
    """Where pdcluster's router computed the run's prompts (its placement counters)."""
    placed = {k: v for k, v in result.server_counters.items() if k.startswith("pdcluster_router_placements_total")}
    count = {where: sum(v for k, v in placed.items() if f'placement="{where}"' in k) for where in ("remote", "local")}
    return f"{count['remote']:.0f}/{count['local']:.0f}"


def _misses(result: RateResult) -> str:
    m = result.slo_misses
    return f"{m['ttft']}/{m['tpot']}/{m['both']}"


def _print_goals(rates: dict[str, dict[str, float]], verdicts: dict[str, dict]) -> None:
    print("\ngoodput (highest rate with >= 90% of requests within both SLOs) and goals")
    for name, by_system in rates.items():
        met = "; ".join(f"{goal}: {'met' if g['met'] else 'MISSED'}" for goal, g in verdicts[name].items())
        print(f"  {name}: co-located {by_system['colocated']:g} req/s, pdcluster {by_system['pdcluster']:g} req/s; {met}")


def _dollars(result: RateResult) -> str:
    usd = result.cost_usd_per_million_tokens.get("output")
    return "-" if usd is None else f"{usd:.2f}"


def _print_table(
    comparisons: list[Comparison],
    engine: EngineConfig,
    cpus: list[int],
    workloads: dict[str, Workload],
    slo_ttft_ms: float,
    slo_itl_ms: float,
) -> None:
    print(
        f"\nmodel {engine.model}; co-located = one vLLM engine on cores {cpus}; pdcluster = prefill on {cpus[: len(cpus) // 2]}, "
        f"decode on {cpus[len(cpus) // 2 :]}; SLO TTFT <= {slo_ttft_ms:g} ms and TPOT <= {slo_itl_ms:g} ms; ratio = pdcluster / co-located"
    )

    def fmt(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) and v < 10 else f"{v:.0f}"

    titles = {n: f"~{w.prompt_tokens} prompt / ~{w.output_tokens} output tokens ({w.distribution})" for n, w in workloads.items()}
    if any(c.workload == "trace" for c in comparisons):
        titles["trace"] = "trace replay"
    for name, title in titles.items():
        print(f"\n{name}: {title}")
        print(
            f"{'rate':>5} | "
            + " | ".join(f"{'p99 ' + label + ' ms co/pd':>19} {'ratio':>5}" for label in LATENCIES.values())
            + f" | {'in SLOs co/pd':>13} {'ratio':>5} | {'missed TTFT/TPOT/both co | pd':>29}"
            + f" | {'pd remote/local':>15} | {'out tok/s co/pd':>15} | {'$/1M out co/pd':>15} | {'failed co/pd':>12}"
        )
        for c in (c for c in comparisons if c.workload == name):
            a, b = c.colocated, c.pdcluster
            latencies = " | ".join(f"{fmt(_value(a, m)):>9}/{fmt(_value(b, m)):<9} {fmt(c.ratio(m)):>5}" for m in LATENCIES)
            print(
                f"{c.rate:>5g} | {latencies} | {a.slo_attainment:>6.0%}/{b.slo_attainment:<6.0%} {fmt(c.ratio('slo_attainment')):>5} | "
                f"{_misses(a):>13} | {_misses(b):<13} | {_placed(b):>15} | "
                f"{a.output_tok_per_s:>7.1f}/{b.output_tok_per_s:<7.1f} | {_dollars(a):>7}/{_dollars(b):<7} | {a.failed:>5}/{b.failed:<6}"
            )
