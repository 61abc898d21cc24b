"""`pdcluster serve` on a local Ray: pools as Ray actors, the controller healing a killed
decode worker while requests stream (none lost, exact text, its engine gone with it, every KV
block free after), `pdcluster status` with the replacement's cold start by phase, and a clean
shutdown that leaves no process behind."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdcluster.cluster.cluster_status import ClusterStatus
from pdcluster.common.ports import free_port
from pdcluster.common.serve_process import launch_serve, stop_serve
from pdcluster.common.start_marks import PHASES, start_phases
from pdcluster.common.tiny_model.generate import CORPUS
from pdcluster.common.worker_record import Role
from pdcluster.protos import inference_pb2 as ipb
from pdcluster.protos import inference_pb2_grpc as igrpc
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc

from tests.support.kv_at_rest import workers_at_rest
from tests.support.paths import ROOT
from tests.support.processes import EAGER

pytestmark = pytest.mark.slow

MAX_TOKENS = 200
PREFILL_KV_BLOCKS = 100  # room for every prompt here, and unlike the default


@pytest.fixture(scope="module")
def serve():
    """`pdcluster serve --prefill 2 --decode 1` on free ports."""
    # The prefill pool's own engine flags, which must reach its engines and only theirs.
    prefill_args = ["--prefill-args", f"--num-gpu-blocks-override {PREFILL_KV_BLOCKS}"]
    # A dead Ray head's address, as one killed without `ray stop` leaves: a local cluster starts its own Ray.
    dead_head = {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    proc, lines, served = launch_serve(
        ["--prefill", "2", "--decode", "1", "--port", "0", "--grpc-port", "0", *prefill_args, *EAGER], env=dead_head
    )
    yield proc, served.router.http, lines
    stop_serve(proc)


def cluster_workers(url: str) -> list[dict]:
    return httpx.get(url + "/cluster", timeout=30).json()["workers"]


def listening_addresses(pid: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Where a process and its children (the vLLM engine, which serves the KV endpoint) listen."""
    pids = {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    listening = {
        ipaddress.ip_address(c.laddr.ip) for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
    }
    return {getattr(ip, "ipv4_mapped", None) or ip for ip in listening}


def test_serve_starts_pools_and_heals_a_killed_decode_worker(serve, tokenizer):
    proc, url, lines = serve
    workers = cluster_workers(url)
    assert sorted(w["role"] for w in workers) == ["decode", "prefill", "prefill"]
    assert all(w["healthy"] for w in workers)
    assert [w["total_kv_blocks"] == PREFILL_KV_BLOCKS for w in workers] == [w["role"] == "prefill" for w in workers]  # --prefill-args
    # A local cluster's workers listen on loopback only: Worker service, KV endpoint, data channel, metrics.
    for w in workers:
        assert w["address"].startswith("127.0.0.1:") and w["kv_endpoint"].startswith("127.0.0.1:")
        listening = listening_addresses(w["pid"])
        assert len(listening) >= 1 and all(ip.is_loopback for ip in listening), (w, listening)
        # Never open: the Worker service wants the token `pdcluster serve` generated; health stays open to probes.
        with grpc.insecure_channel(w["address"]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                wgrpc.WorkerStub(channel).Stats(wpb.StatsRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    # So does everything else it started: Ray's GCS, raylet, object manager and actors, the router.
    everything = listening_addresses(proc.pid)
    assert len(everything) >= 1 and all(ip.is_loopback for ip in everything), everything
    assert httpx.get(url + "/health").status_code == 200

    channel = grpc.insecure_channel(grpc_address(lines))
    stub = igrpc.InferenceStub(channel)
    requests, expected = greedy_requests(stub, tokenizer, count=3, stride=150, length=200)

    decode = next(w for w in workers if w["role"] == "decode")
    engine = psutil.Process(decode["pid"]).children(recursive=True)  # its vLLM engine core
    assert engine
    killed_at = [0.0]

    def kill() -> None:
        os.kill(decode["pid"], signal.SIGKILL)
        killed_at[0] = time.monotonic()

    # No request lost: each completes with exactly the greedy tokens of an undisturbed run.
    assert streamed_through(stub, requests, kill) == expected
    channel.close()
    killed_at = killed_at[0]

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        decodes = [w for w in cluster_workers(url) if w["role"] == "decode"]
        if decodes and all(w["healthy"] and w["pid"] != decode["pid"] for w in decodes):
            break
        time.sleep(1)
    heal_s = time.monotonic() - killed_at
    assert len(decodes) == 1 and decodes[0]["healthy"] and decodes[0]["pid"] != decode["pid"]
    print(f"decode pool healed {heal_s:.1f}s after SIGKILL (engine start included)")
    # The killed worker's engine went with it; the streams it held left no KV behind anywhere.
    _, alive = psutil.wait_procs(engine, timeout=30)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), [p.pid for p in alive]
    workers_at_rest(lambda: cluster_workers(url))

    # The replacement's first request: its cold start, phase by phase, from the heal's decision.
    assert httpx.post(url + "/v1/completions", json={"prompt": "The mill", "max_tokens": 2}, timeout=120).status_code == 200
    status = subprocess.run(
        [sys.executable, "-m", "pdcluster.cli", "status", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stderr
    report = ClusterStatus.model_validate_json(status.stdout.strip().splitlines()[-1])
    assert report.pools[Role.PREFILL].ready == 2 and report.pools[Role.DECODE].ready == 1
    heal = report.heals[-1]
    assert heal.role == "decode" and heal.seconds > 0
    print(f"controller heal record: {heal}")
    replacement = next(r for r in report.replicas if r.id == heal.replacement)
    seen = next(w for w in cluster_workers(url) if w["address"] == replacement.address)
    phases = start_phases(replacement.decided_at, replacement.start, seen["joined_at"], seen["first_routed_at"], seen["first_token_at"])
    print(f"replacement's cold start: {phases}")
    assert replacement.decided_at >= heal.detected_at and replacement.start.placed > 0 and replacement.start.compile_s == 0  # eager
    assert all(phases[p] >= 0 for p in PHASES) and phases["total"] == pytest.approx(sum(phases[p] for p in PHASES), abs=0.05)


def greedy_requests(stub, tokenizer, count: int, stride: int, length: int) -> tuple[list, list[list[int]]]:
    """Greedy requests on the corpus, with their answers from the undisturbed cluster."""
    ids = tokenizer(CORPUS.read_text()).input_ids
    requests = [
        ipb.GenerateRequest(prompt_token_ids=ids[i * stride : i * stride + length], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        for i in range(count)
    ]
    return requests, [list(stub.Complete(r).token_ids) for r in requests]


def grpc_address(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("pdcluster ready")).split("grpc ")[1].split(",")[0]


def streamed_through(stub, requests: list, event) -> list[list[int]]:
    """Each request's streamed tokens, with `event()` called once every stream has its first."""
    results: dict[int, list[int]] = {}
    first_token = threading.Barrier(len(requests) + 1, timeout=120)

    def stream(i: int) -> None:
        tokens: list[int] = []
        for n, reply in enumerate(stub.Generate(requests[i])):
            tokens += reply.token_ids
            if n == 0:
                first_token.wait()
        results[i] = tokens

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    first_token.wait()  # every request is streaming
    event()
    for t in threads:
        t.join(600)
    return [results.get(i) for i in range(len(requests))]


def exported_metric_names(url: str) -> set[str]:
    text = httpx.get(url, timeout=30).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_metric_is_exported(serve):
    proc, url, lines = serve
    status = subprocess.run(
        [sys.executable, "-m", "pdcluster.cli", "status", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    controller_metrics = f"http://{json.loads(status.stdout.strip().splitlines()[-1])['metrics_address']}/metrics"
    # Cost per token needs served tokens in the controller's window: one request, then a few rounds.
    assert httpx.post(url + "/v1/completions", json={"prompt": "The mill", "max_tokens": 4}, timeout=120).status_code == 200
    deadline = time.monotonic() + 60
    while "pdcluster_cost_usd_per_million_tokens" not in exported_metric_names(controller_metrics) and time.monotonic() < deadline:
        time.sleep(1)
    exported = exported_metric_names(url + "/metrics") | exported_metric_names(controller_metrics)
    with open(os.path.join(ROOT, "deploy", "observability", "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    queried = {m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"pdcluster_[a-z0-9_]+", t["expr"])}
    assert len(queried) >= 15
    # A histogram is queried by its _bucket series.
    missing = sorted(m for m in queried if m not in exported)
    assert not missing, missing


def test_sigint_stops_everything_it_started(serve):
    proc, url, lines = serve
    started = psutil.Process(proc.pid).children(recursive=True)
    workers = [psutil.Process(w["pid"]) for w in cluster_workers(url)]
    assert len(started) > len(workers)  # Ray's processes, the actors, the workers and their engines
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(180) == 0, "".join(lines[-30:])
    gone, alive = psutil.wait_procs(started + workers, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [(p.pid, p.cmdline()[:3]) for p in alive]
