"""A switch outlives the controller that made it, on real Ray: a decode replica of a
role-switching cluster moves to the prefill pool, the controller is SIGKILLed, and its next
life (Ray restarts it) keeps both pools at their sizes without restarting a healthy worker.
The cluster runs with `tls:` in its spec, so the controller probes, switches and adopts its
workers over mutual TLS, and the workers refuse plaintext."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdcluster.common.serve_process import launch_serve, stop_serve

from tests.support.certificates import make_certificates
from tests.support.processes import SMALL_KV_BYTES

pytestmark = pytest.mark.slow

NAME = "switch-test"
SPEC = {
    "name": NAME,
    "engine": {"enforce_eager": True, "kv_cache_memory_bytes": SMALL_KV_BYTES},
    "prefill": {"replicas": 1, "max_replicas": 2},
    "decode": {"replicas": 2, "max_replicas": 2},
    # Role-switching workers; the autoscaler itself never acts within the test.
    "autoscaling": {"enabled": True, "role_switching": True, "interval_s": 1, "upscale_delay_s": 3600, "downscale_delay_s": 3600},
}


def pdcluster(ray_address: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pdcluster", *args, "--name", NAME, "--address", ray_address]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def status(ray_address: str) -> dict:
    out = pdcluster(ray_address, "status", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def pools_and_pids(report: dict) -> tuple[dict, dict]:
    pools = {role: (p["ready"], p["target"]) for role, p in report["pools"].items()}
    return pools, {r["id"]: (r["role"], r["pid"], r["state"]) for r in report["replicas"]}


def health(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_a_switched_replica_keeps_its_pool_when_the_controller_restarts(tmp_path):
    member = make_certificates(tmp_path)["member"]
    spec_path = tmp_path / "cluster.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "tls": member.model_dump()}))
    proc, _, served = launch_serve(["--config", str(spec_path), "--no-router"])
    try:
        assert served.router is None and (served.prefill_workers, served.decode_workers) == (1, 2)
        ray = served.ray_address
        before = status(ray)
        for replica in before["replicas"]:  # the spec's TLS reached every worker
            assert health(replica["address"], member.channel_credentials()) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as plaintext:
                health(replica["address"], None)
            assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        moved = next(r["id"] for r in before["replicas"] if r["role"] == "decode")
        assert moved.startswith("replica-")  # ids name no role

        switched = pdcluster(ray, "switch", moved, "prefill")
        assert switched.returncode == 0 and f"{moved} serves prefill" in switched.stdout, switched.stderr[-2000:]
        pools, replicas = pools_and_pids(status(ray))
        assert pools == {"prefill": (2, 2), "decode": (1, 1)}
        assert replicas[moved][0] == "prefill"

        os.kill(before["controller_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 180
        while True:  # Ray restarts the controller; its next life adopts the replicas
            assert time.monotonic() < deadline, "the controller did not come back"
            time.sleep(2)
            try:
                after = status(ray)
            except AssertionError:
                continue
            if after["controller_pid"] != before["controller_pid"] and pools_and_pids(after) == (pools, replicas):
                break
        time.sleep(5)  # several rounds of the new life: it starts, stops and switches nothing
        assert pools_and_pids(status(ray)) == (pools, replicas)
    finally:
        stop_serve(proc)
