"""`ray up` for real: a lab whose hosts are machines to SSH into (sshd, each host its own home,
/etc/hosts and /tmp/ray), brought up by Ray's cluster launcher from deploy/ray/local.yaml (the
lab's variant: its addresses and key, less the install, since the hosts share this checkout).
Ray's autoscaler on the head starts every worker host over SSH, each advertising the pool its
~/pdcluster-pool.json names. Then the README's command, `ray exec CLUSTER.yaml 'cd ~/pdcluster
&& .venv/bin/pdcluster serve --address auto ...'`: each pool lands on its host, a completion is
served, the end of the SSH session stops the cluster's workers (its SIGHUP), and `ray down`
stops Ray on the head. Where namespaces or sshd are missing, the lab's error fails the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pdcluster.common.worker_record import ServeRecord
from pdcluster.lab.lab_hosts import cluster_yaml, down, existing_namespaces, host_command, lab_dir, netns_pids, up
from pdcluster.lab.lab_spec import RAY_PORT, LabSpec

pytestmark = pytest.mark.slow

LAB = LabSpec(name="pdrayup", subnet="10.79.0.0/24", ssh=True, ray=False)
HEAD = LAB.host("head").address
RAY = str(Path(sys.executable).with_name("ray"))
README_SERVE = "cd ~/pdcluster && .venv/bin/pdcluster serve --address auto --config deploy/cluster.example.yaml --host 0.0.0.0"
ASK = """
import httpx, json, sys
base = sys.argv[1]
reply = httpx.post(base + "/v1/completions", json={"prompt": "The cluster", "max_tokens": 8, "temperature": 0}, timeout=120)
print(json.dumps({"status": reply.status_code, "reply": reply.json(), "workers": httpx.get(base + "/cluster", timeout=30).json()["workers"]}))
"""


def on_head(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(host_command(LAB.name, "head", argv), capture_output=True, text=True, timeout=timeout)


def lab_processes(words: tuple[str, ...]) -> list[str]:
    """Command lines of the processes on the lab's hosts that hold any of `words`."""
    found = []
    for netns in existing_namespaces(LAB.name):
        for pid in netns_pids(netns):
            try:
                command = " ".join(psutil.Process(pid).cmdline())
            except psutil.NoSuchProcess:
                continue
            if any(word in command for word in words):
                found.append(f"{netns}: {command[:160]}")
    return found


def wait_until_gone(words: tuple[str, ...], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := lab_processes(words)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def test_ray_up_over_ssh_then_the_readmes_serve_command(tmp_path):
    up(LAB)
    try:
        cluster = str(cluster_yaml(LAB.name))
        launched = on_head([RAY, "up", "-y", cluster])
        assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]

        # The README's command, as written; a ready file and --enforce-eager spare the test a poll and a compile.
        ready = lab_dir(LAB.name) / "ready.json"
        log = tmp_path / "ray_exec.log"
        with open(log, "w") as out:
            session = subprocess.Popen(
                host_command(LAB.name, "head", [RAY, "exec", cluster, f"{README_SERVE} --enforce-eager --ready-file {ready}"]),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 400
        while not ready.exists():
            assert session.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        record = ServeRecord.model_validate_json(ready.read_text())
        assert record.ray_address == f"{HEAD}:{RAY_PORT}" and record.prefill_workers == record.decode_workers == 1

        asked = on_head([sys.executable, "-c", ASK, f"http://{HEAD}:8000"])
        assert asked.returncode == 0, asked.stderr[-3000:]
        answer = json.loads(asked.stdout.strip().splitlines()[-1])
        assert answer["status"] == 200, answer
        assert answer["reply"]["usage"]["completion_tokens"] == 8 and answer["reply"]["choices"][0]["finish_reason"] == "length"
        # Each pool on the host whose ~/pdcluster-pool.json names it, listening on that host's address.
        for worker in answer["workers"]:
            address = LAB.host(f"{worker['role']}-1").address
            assert worker["address"].startswith(address + ":") and worker["kv_endpoint"].startswith(address + ":") and worker["healthy"], (
                worker
            )
        assert sorted(w["role"] for w in answer["workers"]) == ["decode", "prefill"]

        # The SSH session ends (its client killed): serve gets SIGHUP and stops the workers on both hosts.
        os.killpg(session.pid, signal.SIGTERM)
        session.wait(timeout=30)
        left = wait_until_gone(("pdcluster serve", "pdcluster.prefill_worker", "pdcluster.decode_worker"), 120)
        assert not left, left

        # `ray down` runs `ray stop` on the head over SSH (the setup put the checkout's ray on its PATH).
        stopped = on_head([RAY, "down", "-y", cluster])
        assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
        assert not wait_until_gone(("gcs_server",), 30)
    finally:
        down(LAB.name)
    assert not existing_namespaces(LAB.name)
