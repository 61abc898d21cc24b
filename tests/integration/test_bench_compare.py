"""`pdcluster bench compare` end to end on the tiny model (a short sweep: the numbers that
matter come from the bench model, recorded in bench/RESULTS.md), and CPU pinning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pdcluster.common.processes import spawn

from tests.support.paths import ROOT
from tests.support.processes import EAGER


def test_spawn_confines_the_process_to_the_given_cores(tmp_path):
    log = tmp_path / "out.txt"
    with open(log, "wb") as fh:
        proc = spawn([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"], fh, cpus={0})
        assert proc.wait(60) == 0
    assert log.read_text().strip() == "[0]"


@pytest.mark.slow
def test_bench_compare_runs_both_systems_on_the_same_load(model_dir, tmp_path):
    json_path, png_path = tmp_path / "compare.json", tmp_path / "compare.png"
    cmd = [
        sys.executable,
        "-m",
        "pdcluster.cli",
        "bench",
        "compare",
        "--model",
        str(model_dir),
        "--rates",
        "2",
        "4",
        "--requests",
        "4",
        "--workloads",
        "prefill-heavy",
        "balanced",
        # The router places prompts by predictions from a profile of another model: its
        # observed TTFTs correct them as requests are served.
        "--profile",
        str(ROOT / "bench" / "profiles" / "cpu1-bench-llama.json"),
        "--json-out",
        str(json_path),
        "--plot",
        str(png_path),
        *EAGER,
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(json_path.read_text())
    assert report["cores"] == sorted(os.sched_getaffinity(0))
    rows = [(c["workload"], c["rate"]) for c in report["comparisons"]]
    assert rows == [("prefill-heavy", 2.0), ("prefill-heavy", 4.0), ("balanced", 2.0), ("balanced", 4.0)]
    assert report["router_flags"][:2] == ["--profile", str(ROOT / "bench" / "profiles" / "cpu1-bench-llama.json")]
    slo = report["slo"]  # the router places by the SLOs the report counts by
    assert report["router_flags"][2:] == ["--slo-ttft-ms", str(slo["ttft_ms"]), "--slo-itl-ms", str(slo["itl_ms"])]
    for c in report["comparisons"]:
        for system in ("colocated", "pdcluster"):
            result = c[system]
            assert result["completed"] == result["requests"] == 4, result["errors"]
            assert result["itl_ms"]["p99"] > 0 and result["ttft_ms"]["p99"] > 0
        assert c["ratios"]["itl_ms"] == pytest.approx(c["pdcluster"]["itl_ms"]["p99"] / c["colocated"]["itl_ms"]["p99"], rel=1e-2)
        for system in ("colocated", "pdcluster"):
            result = c[system]
            within = round(result["slo_attainment"] * 4)
            assert within + sum(result["slo_misses"].values()) == 4  # every request: within, or which SLO it missed
            assert report["slo_attainment"][c["workload"]][system][str(c["rate"])] == result["slo_attainment"]
    for workload in ("prefill-heavy", "balanced"):
        for system in ("colocated", "pdcluster"):
            attainment = report["slo_attainment"][workload][system]
            # DistServe's goodput: the highest rate before attainment first drops under 90%.
            expected = 0.0 if attainment["2.0"] < 0.9 else 2.0 if attainment["4.0"] < 0.9 else 4.0
            assert report["goodput_rate"][workload][system] == expected
        # Each goal's figure comes from the sweep, and its verdict from the figure.
        goodput, ratio = report["goodput_rate"][workload], report["goals"][workload]["goodput_rate_ratio"]
        if goodput["colocated"]:
            assert ratio["value"] == pytest.approx(goodput["pdcluster"] / goodput["colocated"], abs=1e-3)
            assert ratio["met"] == (ratio["value"] >= ratio["goal"])
        else:
            assert ratio["value"] is None and ratio["met"]  # neither reached 90%: a tie, or pdcluster ahead
        below = report["goals"][workload]["attainment_never_below_colocated"]
        assert below["met"] == (not below["rates_below"])
    itl = report["goals"]["prefill-heavy"]["p99_itl_ratio"]
    assert itl["values"] == [c["ratios"]["itl_ms"] for c in report["comparisons"] if c["workload"] == "prefill-heavy"]
    assert itl["met"] == all(v <= itl["goal"] for v in itl["values"])
    assert "goodput (highest rate with >= 90%" in run.stdout
    assert "ratio = pdcluster / co-located" in run.stdout and "prefill-heavy" in run.stdout
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
