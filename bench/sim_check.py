"""`pdcluster bench simcheck`: the simulator's predictions beside a `bench compare` run.

Replays, in the simulator, exactly the requests `bench compare` sent (the same seeded
workloads and rates, the same scaled trace) for both of its systems: co-located (one engine
on all cores: a profile measured on all of them) and pdcluster 1P+1D (each worker on half:
a profile measured on one half), and prints predicted against measured p50 and p99 TTFT and
p99 ITL with the error of each.
"""

from __future__ import annotations

import json
from dataclasses import replace

from pdcluster.common.engine_profile import EngineProfile
from pdcluster.planner.simulator import ClusterShape, simulate
from pdcluster.planner.workloads import RequestShape, Workload
from pdcluster.router.config import RouterConfig

METRICS = (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p99"))
TOLERANCE = 0.25


def _runs(measured: dict, trace: list[RequestShape]) -> list[tuple[str, float, list[RequestShape]]]:
    runs = []
    for name, fields in measured["workloads"].items():
        workload = Workload(**fields)
        rates = sorted({c["rate"] for c in measured["comparisons"] if c["workload"] == name})
        requests = next(c["colocated"]["requests"] for c in measured["comparisons"] if c["workload"] == name)
        runs += [(name, rate, replace(workload, seed=workload.seed + i).shapes(requests, rate)) for i, rate in enumerate(rates)]
    if trace:
        rate = next(c["rate"] for c in measured["comparisons"] if c["workload"] == "trace")
        runs.append(("trace", rate, trace))
    return runs


def main(
    measured_path: str, colocated: EngineProfile, disaggregated: EngineProfile, trace: list[RequestShape], json_path: str = ""
) -> list[dict]:
    with open(measured_path) as f:
        measured = json.load(f)
    slo = measured["slo"]
    router = RouterConfig(**_router_overrides(measured.get("router_flags", [])))
    systems = {
        "colocated": ClusterShape(None, colocated, 0, 1, router),
        "pdcluster": ClusterShape(disaggregated, disaggregated, 1, 1, router),
    }
    rows = []
    for workload, rate, requests in _runs(measured, trace):
        real = next(c for c in measured["comparisons"] if c["workload"] == workload and c["rate"] == rate)
        for system, shape in systems.items():
            predicted = simulate(shape, requests, slo["ttft_ms"], slo["itl_ms"])
            for metric, p in METRICS:
                m, s = real[system][metric][p], predicted[metric][p]
                error = (s - m) / m if m else None
                rows.append(
                    {
                        "workload": workload,
                        "rate": rate,
                        "system": system,
                        "metric": f"{p} {metric[:-3].upper()}",
                        "measured_ms": m,
                        "predicted_ms": s,
                        "error": error,
                    }
                )
    print(f"{'workload':>14} {'rate':>5} {'system':>10} {'metric':>9} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
    for r in rows:
        flag = "" if r["error"] is not None and abs(r["error"]) <= TOLERANCE else "  *"
        error = "-" if r["error"] is None else f"{r['error']:+.0%}"
        print(
            f"{r['workload']:>14} {r['rate']:>5g} {r['system']:>10} {r['metric']:>9} {r['measured_ms']:>12.0f} {r['predicted_ms']:>13.0f} {error:>7}{flag}"
        )
    within = sum(1 for r in rows if r["error"] is not None and abs(r["error"]) <= TOLERANCE)
    print(f"\n{within} of {len(rows)} predictions within {TOLERANCE:.0%} of measured (* marks the others)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"measured": measured_path, "rows": rows}, f, indent=1)
    return rows


def _router_overrides(flags: list[str]) -> dict:
    from pdcluster.router.config import parse_router_args

    return parse_router_args(list(flags)).model_dump(include={"bypass_prefill_below_tokens", "local_prefill_above_queued_tokens"})
