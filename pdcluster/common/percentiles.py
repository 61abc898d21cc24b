"""The percentiles the benchmarks and the simulator report, in one shape: nearest rank of
the sorted values, as {"p50": ms, "p90": ms, "p99": ms}."""

from __future__ import annotations

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of non-empty `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def percentiles_ms(seconds: list[float]) -> dict:
    """p50/p90/p99 of `seconds`, in milliseconds (None without values)."""
    if not seconds:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": round(percentile(seconds, p / 100) * 1e3, 2) for p in PERCENTILES}


def format_ms(d: dict, keys=("p50", "p90", "p99")) -> str:
    """ "12/30/95": the given percentiles of a `percentiles_ms` dict, "-" where missing."""
    return "/".join("-" if d[k] is None else f"{d[k]:.0f}" for k in keys)
