"""`pdcluster bench compare`: disaggregated 1P+1D, and pdcluster as planned, against
co-located vLLM, same cores, one run.

(a) co-located: vLLM's own OpenAI server, one engine on all the given cores, prefill and
decode sharing its steps; (b) pdcluster: one prefill and one decode worker, each pinned to
half of the cores, behind the router, which places each prompt by the workers' profile
against the same SLOs the benchmark counts; (c) pdcluster as planned: for each workload,
the shape `pdcluster plan` chooses for these cores from the engine's profiles (co-located
replicas, or a prefill/decode split), served by pdcluster. All run the same model and engine
settings and get the same seeded open-loop sweep of request rates (`bench serve`) for each
workload. Per workload and rate it prints p99 ITL, TPOT and TTFT and SLO attainment of each
and the ratios to (a); per workload, each system's goodput (DistServe's: the highest rate
with 90% of requests within both SLOs) and the issue's goals. It can write the JSON and a plot.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from pdcluster.bench.rate_plot import plot_grid
from pdcluster.bench.serve_bench import RateResult, goodput_rate, prometheus_counters, replay, run_rate, sweep
from pdcluster.common.openai_stream import served_model
from pdcluster.common.processes import LocalProcess, stop_all
from pdcluster.common.vllm_args import PDCLUSTER_DEFAULTS, engine_args_from_flags, engine_flags
from pdcluster.common.vllm_server import start_vllm_server
from pdcluster.common.worker_record import Role
from pdcluster.planner.local_cluster import engine_env, start_pdcluster
from pdcluster.planner.plan import PLAN_REQUESTS, Candidate, Plan, plan
from pdcluster.planner.profile_files import profiles_by_size
from pdcluster.planner.workloads import COMPARE_RATES, COMPARE_WORKLOADS, RequestShape, Workload
from pdcluster.router.config import parse_router_args
from pdcluster.worker.config import EngineConfig

SYSTEMS = ("colocated", "pdcluster", "planned")
LABELS = {"colocated": "co", "pdcluster": "pd", "planned": "plan"}
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
    planned: RateResult | None = None  # None: no profiles to plan with

    def ratio(self, metric: str, system: str = "pdcluster") -> float | None:
        a, b = (_value(r, metric) for r in (self.colocated, getattr(self, system)))
        return float(f"{b / a:.3g}") if a and b is not None else None  # 3 significant digits: ratios run from 0.001 to 1000

    @property
    def systems(self) -> list[str]:
        return [s for s in SYSTEMS if getattr(self, s) is not None]


def _value(result: RateResult, metric: str) -> float | None:
    return result.slo_attainment if metric == "slo_attainment" else getattr(result, metric)["p99"]


def goodput_rates(comparisons: list[Comparison]) -> dict[str, float]:
    """Each system's goodput over one workload's sweep."""
    return {s: goodput_rate([getattr(c, s) for c in comparisons]) for s in comparisons[0].systems}


def goals(workload: str, comparisons: list[Comparison], system: str = "pdcluster") -> dict:
    """The goals of one pdcluster system for one workload's sweep: each one's figure and
    whether it is met. The fixed 1P+1D also has disaggregation's own goals on prefill-heavy
    load; pdcluster as planned has to match co-located everywhere."""
    rates = goodput_rates(comparisons)
    ratio = round(rates[system] / rates["colocated"], 3) if rates["colocated"] else None
    below = [
        c.rate
        for c in comparisons
        if (c.colocated.slo_attainment - getattr(c, system).slo_attainment) * getattr(c, system).requests > NOISE_REQUESTS + 1e-9
    ]
    out = {
        "attainment_never_below_colocated": {"rates_below": below, "met": not below},
        "goodput_rate_ratio": {"value": ratio, "goal": 1.0, "met": _at_least(ratio, rates[system], 1.0)},
    }
    if workload == "prefill-heavy" and system == "pdcluster":
        out["goodput_rate_ratio_prefill_heavy"] = {"value": ratio, "goal": 1.5, "met": _at_least(ratio, rates[system], 1.5)}
        itl = [c.ratio("itl_ms") for c in comparisons]
        out["p99_itl_ratio"] = {"values": itl, "goal": 0.5, "met": all(r is not None and r <= 0.5 for r in itl)}
    return out


def _at_least(ratio: float | None, rate: float, goal: float) -> bool:
    if ratio is not None:
        return ratio >= goal
    # Co-located never reaches 90%: any pdcluster goodput beats it; none ties it, which only
    # "at least 1.0x" accepts.
    return rate > 0 or goal <= 1.0


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


Start = Callable[[str], tuple[list[LocalProcess], str]]  # a log folder -> the processes and the base URL


def _run_system(
    system: str,
    start: Start,
    workloads: dict[str, Workload],
    rates: list[float],
    requests: int,
    slo_ttft_ms: float,
    slo_itl_ms: float,
    vocab: int,
    cost_per_hour: float,
    trace: list[RequestShape],
) -> dict[str, list[RateResult]]:
    """Start one system, sweep each workload (and replay the trace) through it, stop it."""
    log_dir = tempfile.mkdtemp(prefix=f"pdcluster-compare-{system}-")
    print(f"starting {system} (logs in {log_dir})...", flush=True)
    processes, url = start(log_dir)
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


def planned_workers(chosen: Candidate, cpus: list[int]) -> list[tuple[Role, set[int]]]:
    """The chosen shape's workers on these cores, each replica on its own: co-located replicas
    are decode workers with no prefill pool, which compute every prompt themselves."""
    sizes = [(Role.PREFILL, chosen.prefill_size)] * chosen.prefill_replicas + [(Role.DECODE, chosen.decode_size)] * chosen.decode_replicas
    out, used = [], 0
    for role, size in sizes:
        out.append((role, set(cpus[used : used + size])))
        used += size
    return out


def plan_profiles(model: str, cpus: int, given: Sequence[str]) -> list[str]:
    """The engine's profiles to plan with: those given, or the bench model's shipped ones for
    replicas of up to `cpus` cores."""
    if given or model:
        return list(given)
    return [p for n in range(1, cpus + 1) if (p := default_profile("", n))]


def _plans(
    paths: list[str],
    workloads: dict[str, Workload],
    rates: Sequence[float],
    trace: list[RequestShape],
    cores: int,
    slo_ttft_ms: float,
    slo_itl_ms: float,
    router_flags: list[str],
) -> dict[str, tuple[Plan, str]]:
    """Each workload's plan on these cores, and the profile its router predicts with."""
    profiles = profiles_by_size(paths)  # also refuses two profiles of one size
    path_of = {size: p for p in paths for size in profiles_by_size([p])}  # the file each size came from
    router = parse_router_args(router_flags)
    shapes = {name: w.shapes(PLAN_REQUESTS, rates[0]) for name, w in workloads.items()}
    if trace:
        shapes["trace"] = trace
    out = {}
    for name, requests_of in shapes.items():
        chosen = plan(profiles, requests_of, slo_ttft_ms, slo_itl_ms, cores, {}, router, progress=lambda _: None)
        out[name] = chosen, path_of[chosen.chosen.decode_size]
        print(f"  plan for {name}: {chosen.chosen.describe()}. Why: {chosen.reason}", flush=True)
    return out


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
                (
                    f"{workload}: {label}",
                    label,
                    {s: (rates, [_value(getattr(c, s), metric) for c in chosen]) for s in chosen[0].systems},
                )
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
    plan_with: Sequence[str] = (),
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
    trace = list(trace)
    slo_flags = ["--slo-ttft-ms", str(slo_ttft_ms), "--slo-itl-ms", str(slo_itl_ms)]

    def router_with(profile: str) -> list[str]:
        # The router keeps the SLOs the benchmark counts, predicting from the workers' profile.
        return [*(["--profile", profile] if profile else []), *slo_flags, *router_flags]

    fixed_flags = router_with(profile or default_profile(model, len(cpus) // 2))
    half = len(cpus) // 2

    def colocated(log_dir: str) -> tuple[list[LocalProcess], str]:
        proc, url = start_colocated(engine, set(cpus), log_dir)
        return [proc], url

    starts: dict[str, Start] = {
        "colocated": colocated,
        "pdcluster": lambda log_dir: start_pdcluster(
            engine, [(Role.PREFILL, set(cpus[:half])), (Role.DECODE, set(cpus[half:]))], log_dir, fixed_flags
        ),
    }
    sweep_args = (list(rates), requests, slo_ttft_ms, slo_itl_ms, vocab, cost_per_hour)
    by_system = {system: _run_system(system, start, chosen, *sweep_args, trace=trace) for system, start in starts.items()}
    plans: dict[str, tuple[Plan, str]] = {}
    if paths := plan_profiles(model, len(cpus), plan_with):
        print(f"planning each workload's shape on {len(cpus)} cores from {paths}...", flush=True)
        plans = _plans(paths, chosen, rates, trace, len(cpus), slo_ttft_ms, slo_itl_ms, fixed_flags)
        by_system["planned"] = {}
        # One cluster per distinct shape, serving the workloads planned onto it.
        for key in dict.fromkeys((p.chosen.describe(), path) for p, path in plans.values()):
            names = [n for n, (p, path) in plans.items() if (p.chosen.describe(), path) == key]
            shape, path = plans[names[0]][0].chosen, key[1]

            def start(log_dir: str, shape=shape, path=path):
                return start_pdcluster(engine, planned_workers(shape, cpus), log_dir, router_with(path))

            by_system["planned"].update(
                _run_system(
                    "planned",
                    start,
                    {n: chosen[n] for n in names if n in chosen},
                    *sweep_args,
                    trace=trace if "trace" in names else [],
                )
            )
    else:
        print("no profiles to plan with (--plan-with): pdcluster as planned is left out", flush=True)

    def row(name: str, i: int, rate: float) -> Comparison:
        results = {s: by_system[s][name][i] for s in by_system}
        return Comparison(name, rate, **results)

    comparisons = [row(name, i, rate) for name in chosen for i, rate in enumerate(rates)]
    if trace:
        comparisons.append(row("trace", 0, trace_rate(trace)))
    by_workload = {name: [c for c in comparisons if c.workload == name] for name in dict.fromkeys(c.workload for c in comparisons)}
    _print_table(comparisons, engine, cpus, chosen, slo_ttft_ms, slo_itl_ms)
    goodput = {name: goodput_rates(rows) for name, rows in by_workload.items()}
    verdicts = {
        name: {system: goals(name, rows, system) for system in rows[0].systems if system != "colocated"}
        for name, rows in by_workload.items()
    }
    _print_goals(goodput, verdicts, plans)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(
                {
                    "model": engine.model,
                    "cores": cpus,
                    "router_flags": fixed_flags,
                    "workloads": {n: asdict(w) for n, w in chosen.items()},
                    "slo": {"ttft_ms": slo_ttft_ms, "itl_ms": slo_itl_ms},
                    "cost_per_hour": cost_per_hour,
                    "plans": {
                        n: {"shape": p.chosen.describe(), "reason": p.reason, "router_profile": path, "chosen": asdict(p.chosen)}
                        for n, (p, path) in plans.items()
                    },
                    "comparisons": [
                        {**asdict(c), "ratios": {s: {m: c.ratio(m, s) for m in (*LATENCIES, "slo_attainment")} for s in c.systems[1:]}}
                        for c in comparisons
                    ],
                    "goodput_rate": goodput,
                    "slo_attainment": {
                        name: {s: {str(c.rate): getattr(c, s).slo_attainment for c in rows} for s in rows[0].systems}
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
            f"co-located vLLM ({len(cpus)} cores) vs pdcluster 1P+1D ({len(cpus) // 2}+{len(cpus) - len(cpus) // 2} cores)"
            f"{' and as planned' if plans else ''}; SLO TTFT {slo_ttft_ms:g} ms, TPOT {slo_itl_ms:g} ms",
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


def _print_goals(rates: dict[str, dict[str, float]], verdicts: dict[str, dict[str, dict]], plans: dict[str, tuple[Plan, str]]) -> None:
    print("\ngoodput (highest rate with >= 90% of requests within both SLOs) and goals")
    for name, by_system in rates.items():
        print(f"  {name}: " + ", ".join(f"{system} {rate:g} req/s" for system, rate in by_system.items()))
        for system, verdict in verdicts[name].items():
            print(f"    {system}: " + "; ".join(f"{goal}: {'met' if g['met'] else 'MISSED'}" for goal, g in verdict.items()))
        if name in plans:
            print(f"    planned shape: {plans[name][0].chosen.describe()}; why: {plans[name][0].reason}")


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
    systems = comparisons[0].systems
    labels = "/".join(LABELS[s] for s in systems)
    print(
        f"\nmodel {engine.model}; co = one vLLM engine on cores {cpus}; pd = pdcluster, prefill on {cpus[: len(cpus) // 2]}, "
        f"decode on {cpus[len(cpus) // 2 :]}; plan = pdcluster in the shape `pdcluster plan` chose; "
        f"SLO TTFT <= {slo_ttft_ms:g} ms and TPOT <= {slo_itl_ms:g} ms; ratios to co-located"
    )

    def fmt(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) and v < 10 else f"{v:.0f}"

    def each(values) -> str:
        return "/".join(values)

    titles = {n: f"~{w.prompt_tokens} prompt / ~{w.output_tokens} output tokens ({w.distribution})" for n, w in workloads.items()}
    if any(c.workload == "trace" for c in comparisons):
        titles["trace"] = "trace replay"
    for name, title in titles.items():
        print(f"\n{name}: {title}")
        print(
            "rate | "
            + " | ".join(f"p99 {label} ms {labels} (ratios)" for label in LATENCIES.values())
            + f" | in SLOs {labels} | missed TTFT/TPOT/both {labels} | remote/local {labels[len('co/') :]} | out tok/s {labels} | $/1M out {labels} | failed {labels}"
        )
        for c in (c for c in comparisons if c.workload == name):
            results = [getattr(c, s) for s in systems]
            latencies = " | ".join(
                f"{each(fmt(_value(r, m)) for r in results)} ({each(fmt(c.ratio(m, s)) for s in systems[1:])})" for m in LATENCIES
            )
            print(
                f"{c.rate:g} | {latencies} | {each(f'{r.slo_attainment:.0%}' for r in results)} | {' ; '.join(_misses(r) for r in results)} | "
                f"{' ; '.join(_placed(r) for r in results[1:])} | {each(f'{r.output_tok_per_s:.1f}' for r in results)} | {each(_dollars(r) for r in results)} | "
                f"{each(str(r.failed) for r in results)}"
            )
