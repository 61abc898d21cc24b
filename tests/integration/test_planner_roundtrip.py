"""`pdcluster profile` -> `simulate` -> `plan --write-spec` -> `serve --config` on the tiny
model: each step takes the last one's output, and the cluster the plan chose serves."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import yaml
from transformers import AutoConfig

from pdcluster.cluster.cluster_spec import ClusterSpec
from pdcluster.common.engine_profile import load_profile
from pdcluster.common.serve_process import launch_serve, stop_serve
from pdcluster.common.tiny_model.generate import ensure_tiny_model

from tests.support.paths import ROOT, TRACES
from tests.support.processes import EAGER

pytestmark = pytest.mark.slow


def pdcluster(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pdcluster", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_profile_simulate_plan_serve(tmp_path):
    profile_path, spec_path = tmp_path / "tiny-cpu1.json", tmp_path / "plan.yaml"
    pdcluster(
        "profile",
        "--quick",
        "--cores",
        "1",
        "--dtype",
        "float32",
        *EAGER,
        "--kv-transport",
        "tcp",
        "--no-serving-path",  # measured through a running cluster in test_router_api
        "--cost-per-hour",
        "0.5",
        "--out",
        str(profile_path),
    )
    profile = load_profile(profile_path)
    config = AutoConfig.from_pretrained(ensure_tiny_model())
    head = config.hidden_size // config.num_attention_heads
    assert profile.kv_bytes_per_token == config.num_hidden_layers * config.num_key_value_heads * head * 2 * 4  # float32
    assert not profile.estimate and profile.hardware == "CPU, 1 cores" and (profile.gpus_per_replica, profile.cpu_cores) == (0, 1)
    assert profile.cost_per_hour == 0.5
    prefill = sorted((s["tokens"], s["seconds"]) for s in profile.measurements["prefill"] if not s["cached"])
    assert len(prefill) >= 3 and prefill[-1][1] > prefill[0][1]  # longer prompts take longer
    hits = [s for s in profile.measurements["prefill"] if s["cached"]]
    assert hits and profile.measurements["decode"] and profile.transfer_gbps > 0 and profile.tier_gbps > 0
    # The fitted model predicts the samples it came from, in order of magnitude at worst.
    assert max(profile.measurements["fit_relative_error"]) < 1.0
    assert profile.serving_path.remote_request_s == 0 and "not measured" in profile.sources["serving_path"]

    sim = last_json(
        pdcluster(
            "simulate", "--profile", str(profile_path), "--workload", "prefill-heavy", "--rates", "1", "2", "--requests", "20", "--json"
        )
    )
    tiered = last_json(
        pdcluster(
            "simulate",
            "--profile",
            str(profile_path),
            "--workload",
            "prefill-heavy",
            "--requests",
            "20",
            "--kv-offloading-size",
            "0.25",
            "--json",
        )
    )
    assert sum(tiered["prompt_tokens"].values()) == sum(sim["results"][0]["prompt_tokens"].values()) > 0
    assert [r["rate"] for r in sim["results"]] == [1.0, 2.0]
    for r in sim["results"]:
        assert r["completed"] == 20 and set(r["ttft_ms"]) == {"p50", "p90", "p99"}
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] and r["itl_ms"]["p99"] > 0
        assert 0 < r["pools"]["prefill"]["utilization"] <= 1 and r["cost_usd_per_million_tokens"]["output"] > 0
    assert sim["ttft_ms"] == sim["results"][0]["ttft_ms"]

    plan = last_json(
        pdcluster(
            "plan",
            "--profile",
            str(profile_path),
            "--trace",
            str(TRACES / "azure_2023_code_head.csv"),
            "--trace-format",
            "azure",
            "--length-scale",
            "0.1",
            "--cores",
            "2",
            "--slo-ttft-ms",
            "2000",
            "--slo-itl-ms",
            "200",
            "--kv-offloading-size",
            "0",
            "0.25",
            "--write-spec",
            str(spec_path),
            "--json",
        )
    )
    best = plan["chosen"]  # co-located or a split, each on the 2 cores; served whichever it is
    assert best["goodput_rate"] > 0 and not best["estimated"] and best["units"] <= 2 and best["unit"] == "core"
    assert plan["reason"] and plan["reason"] in spec_path.read_text()
    # This trace's prompts share nothing: a tier keeps nothing worth loading, and none is planned.
    assert [t["gib"] for t in plan["tier_sizes"]] == [0, 0.25] and best["tier_gib"] == 0 and "No host KV tier" in plan["reason"]
    spec = ClusterSpec.model_validate(yaml.safe_load(spec_path.read_text()))
    assert (spec.prefill.replicas, spec.decode.replicas) == (best["prefill_replicas"], best["decode_replicas"])
    assert spec.engine.model == profile.model and spec.decode.cost_per_hour == 0.5

    proc, _, served = launch_serve(["--config", str(spec_path), "--port", "0", "--grpc-port", "0", *EAGER])
    try:
        reply = httpx.post(served.router.http + "/v1/completions", json={"prompt": "The old mill", "max_tokens": 8}, timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
        assert httpx.get(served.router.http + "/health", timeout=30).status_code == 200
    finally:
        stop_serve(proc)
