"""`pdcluster serve --prefill 2 --decode 2` on a local Ray with a private Redis registry, as
users run it: its workers listen on loopback only and want the cluster token, each pool gets
its own engine flags, every dashboard metric is exported; the chaos battery (`pdcluster bench
chaos`) then puts it through each fault in turn under steady load (SIGKILL and SIGSTOP of each
worker role, the controller killed, Redis killed, KV connections cut, garbage on every port,
clients hanging up), losing no request, changing no greedy answer, leaving every KV block free
and no stray process, and healing; a replacement's cold start shows phase by phase; and SIGINT
stops everything it started. One cluster for all of it: the tests run in this order."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdcluster.bench.chaos_bench import FAULTS, Battery, ChaosCluster, Load, chaos_prompts
from pdcluster.common.start_marks import PHASES, start_phases
from pdcluster.common.worker_record import Role
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc

from tests.support.paths import ROOT
from tests.support.processes import EAGER

pytestmark = pytest.mark.slow

PREFILL_KV_BLOCKS = 500  # room for every prompt here, and unlike the default
CHAOS_LOAD_S = 7.0  # each fault's window: 14 arrivals, 6 s of them after the fault


@pytest.fixture(scope="module")
def cluster():
    # The prefill pool's own engine flags, which must reach its engines and only theirs.
    flags = [*EAGER, "--prefill-args", f"--num-gpu-blocks-override {PREFILL_KV_BLOCKS}"]
    cluster = ChaosCluster(prefill=2, decode=2, serve_flags=flags)
    yield cluster
    cluster.close()


def cluster_workers(url: str) -> list[dict]:
    return httpx.get(url + "/cluster", timeout=30).json()["workers"]


def listening_addresses(pid: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Where a process and its children (the vLLM engine, which serves the KV endpoint) listen."""
    pids = {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    listening = {
        ipaddress.ip_address(c.laddr.ip) for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
    }
    return {getattr(ip, "ipv4_mapped", None) or ip for ip in listening}


def test_serve_starts_pools_on_loopback_with_their_token_and_flags(cluster):
    workers = cluster_workers(cluster.http)
    assert sorted(w["role"] for w in workers) == ["decode", "decode", "prefill", "prefill"]
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
    everything = listening_addresses(cluster.proc.pid)
    assert len(everything) >= 1 and all(ip.is_loopback for ip in everything), everything
    assert httpx.get(cluster.http + "/health").status_code == 200


def exported_metric_names(url: str) -> set[str]:
    text = httpx.get(url, timeout=30).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_metric_is_exported(cluster):
    controller_metrics = f"http://{cluster.status().metrics_address}/metrics"
    # Cost per token needs served tokens in the controller's window: one request, then a few rounds.
    assert httpx.post(cluster.http + "/v1/completions", json={"prompt": "The mill", "max_tokens": 4}, timeout=120).status_code == 200
    deadline = time.monotonic() + 60
    while "pdcluster_cost_usd_per_million_tokens" not in exported_metric_names(controller_metrics) and time.monotonic() < deadline:
        time.sleep(1)
    exported = exported_metric_names(cluster.http + "/metrics") | exported_metric_names(controller_metrics)
    with open(os.path.join(ROOT, "deploy", "observability", "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    queried = {m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"pdcluster_[a-z0-9_]+", t["expr"])}
    assert len(queried) >= 15
    # A histogram is queried by its _bucket series.
    missing = sorted(m for m in queried if m not in exported)
    assert not missing, missing


@pytest.mark.timeout(1900)  # the battery's own waits, not the suite's per-test 900 s
def test_every_fault_loses_nothing_and_heals(cluster):
    battery = Battery(cluster, Load(cluster.grpc, chaos_prompts(24)), CHAOS_LOAD_S)
    rows = [battery.baseline()]
    for fault in FAULTS:
        rows.append(battery.run(fault))
        print(rows[-1])
    assert {row.fault for row in rows[1:]} == set(FAULTS)
    for row in rows:
        assert row.requests >= 10, row
        assert row.lost == 0 and row.wrong == 0, row
        assert row.kv_at_rest and row.strays == 0, row
        assert row.heal_s < float("inf"), row


def test_status_shows_each_heal_and_a_replacements_cold_start(cluster):
    report = subprocess.run(
        [sys.executable, "-m", "pdcluster.cli", "status", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr
    status = cluster.status()
    assert status.model_dump_json() and json.loads(report.stdout.strip().splitlines()[-1])["name"] == status.name
    assert status.pools[Role.PREFILL].ready == 2 and status.pools[Role.DECODE].ready == 2
    # The battery's four worker faults, each healed by a replacement.
    assert sorted(h.role for h in status.heals) == ["decode", "decode", "prefill", "prefill"] and all(h.seconds > 0 for h in status.heals)
    for _ in range(4):  # requests to both decode workers: the latest replacement serves one
        assert httpx.post(cluster.http + "/v1/completions", json={"prompt": "The mill", "max_tokens": 2}, timeout=120).status_code == 200
    heal = status.heals[-1]
    replacement = next(r for r in status.replicas if r.id == heal.replacement)
    seen = next(w for w in cluster_workers(cluster.http) if w["address"] == replacement.address)
    phases = start_phases(replacement.decided_at, replacement.start, seen["joined_at"], seen["first_routed_at"], seen["first_token_at"])
    print(f"replacement's cold start after {heal.reason}: {phases}")
    assert replacement.decided_at >= heal.detected_at and replacement.start.placed > 0 and replacement.start.compile_s == 0  # eager
    assert all(phases[p] >= 0 for p in PHASES) and phases["total"] == pytest.approx(sum(phases[p] for p in PHASES), abs=0.05)


def test_sigint_stops_everything_it_started(cluster):
    started = psutil.Process(cluster.proc.pid).children(recursive=True)
    workers = [psutil.Process(w["pid"]) for w in cluster_workers(cluster.http)]
    assert len(started) > len(workers)  # Ray's processes, the actors, the workers and their engines
    os.kill(cluster.proc.pid, signal.SIGINT)
    assert cluster.proc.wait(180) == 0, "".join(cluster.lines[-30:])
    gone, alive = psutil.wait_procs(started + workers, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [(p.pid, p.cmdline()[:3]) for p in alive]
