"""`pdcluster bench chaos --lab`: the faults only a network has, on a `pdcluster lab` of
emulated hosts (network namespaces on a bridge, 2 Gbit/s token-bucket links): a head (Ray's
head, Redis, the controller, one router), a prefill host, two decode hosts and a router host.
The load goes to the router on its own host, so the head's router and Redis are a network
away from it, as in a real deployment. Same battery as on one host: a fault-free run records
the answers, then each fault gets its own window of open-loop load.

This process moves into the head's network, so it reaches every host's address; the
controller's status comes from `pdcluster status --json` run on the head."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import yaml

from pdcluster.bench.chaos_bench import Battery, ChaosCluster, worker_or_engine
from pdcluster.cluster.cluster_status import ClusterStatus
from pdcluster.common.processes import start_process, wait_ready
from pdcluster.common.serve_process import launch_serve
from pdcluster.lab.lab_hosts import (
    boot,
    crash,
    cut,
    down,
    enter_network,
    host_command,
    host_env,
    impair,
    impairment_stats,
    kill_redis,
    netns_pids,
    own_network,
    restore,
    return_to_network,
    start_redis,
    up,
)
from pdcluster.lab.lab_spec import RAY_PORT, REDIS_PORT, LabSpec

LAB = LabSpec(name="pdchaos", subnet="10.79.0.0/24", prefill_hosts=1, decode_hosts=2, router_hosts=1, link="2gbit")
LAB_FAULTS = ("kv-link-cut", "router-partition", "kv-loss", "kv-delay", "host-lost", "redis-down")
CLUSTER = "chaoslab"
DECODE_HOSTS = ["decode-1", "decode-2"]
KV_CUT_S = 5.0  # the prefill host cut off from both decode hosts
PARTITION_S = 10.0  # shorter than Ray's verdict on a silent node: a partition, not a host lost
HOST_DOWN_S = 10.0  # a crashed decode host, before it boots again
KV_DELAY_MS, KV_LOSS = 50.0, 0.05
HEAD = LAB.host("head").address


class LabChaosCluster(ChaosCluster):
    def __init__(self, serve_flags: Sequence[str] = ()) -> None:
        self.roles = {"prefill": LAB.prefill_hosts, "decode": LAB.decode_hosts}
        self.started = time.time()
        up(LAB)
        self.home = own_network()
        try:
            enter_network(LAB.name, "head")
            spec = {
                "name": CLUSTER,
                "prefill": {"replicas": LAB.prefill_hosts, "node_resource": "prefill_pool"},
                "decode": {"replicas": LAB.decode_hosts, "node_resource": "decode_pool"},
                "router": {"bypass_prefill_below_tokens": 32},
            }
            spec_path = Path(tempfile.mkdtemp(prefix="pdcluster-chaos-lab-")) / "spec.yaml"
            spec_path.write_text(yaml.safe_dump(spec))
            args = ["--config", str(spec_path), "--address", f"{HEAD}:{RAY_PORT}", "--host", HEAD, "--registry", _REGISTRY]
            args += ["--port", "0", "--grpc-port", "0", *serve_flags]
            self.proc, self.lines, _ = launch_serve(args, prefix=host_command(LAB.name, "head", []), env=host_env())
            host = LAB.host("router-1").address
            args = ["--host", host, "--port", "0", "--grpc-port", "0", "--bypass-prefill-below", "32"]
            args += ["--registry", _REGISTRY, "--cluster-name", CLUSTER]
            router = start_process("router", args, env=host_env(), prefix=host_command(LAB.name, "router-1", []))
            served = wait_ready(router).router
            self.http, self.grpc = served.http, served.grpc
        except BaseException:
            self.close()
            raise

    def status(self) -> ClusterStatus:
        argv = [sys.executable, "-m", "pdcluster", "status", "--json", "--name", CLUSTER, "--address", f"{HEAD}:{RAY_PORT}"]
        done = subprocess.run(host_command(LAB.name, "head", argv), capture_output=True, text=True, env=host_env(), timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"pdcluster status on the head failed: {done.stderr[-2000:]}")
        return ClusterStatus.model_validate_json(done.stdout.strip().splitlines()[-1])

    def kill_redis(self) -> None:
        kill_redis(LAB.name)

    def start_redis(self) -> None:
        start_redis(LAB.name)

    def strays(self) -> list[str]:
        """Worker or engine processes on the lab's hosts that no live worker owns. /cluster
        names each worker's pid as its host sees it (its own PID space)."""
        live: set[int] = set()
        for w in self.workers():
            host = next(h for h in LAB.hosts() if w.address.startswith(h.address + ":"))
            for pid in netns_pids(host.netns):
                if _host_pid(pid) == w.pid:
                    live |= {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
        found = []
        for host in LAB.hosts():
            for pid in netns_pids(host.netns):
                try:
                    process = psutil.Process(pid)
                    cmd = " ".join(process.cmdline())
                    if worker_or_engine(cmd) and pid not in live and process.status() != psutil.STATUS_ZOMBIE:
                        found.append(f"{host.name} {pid} {cmd[:80]}")
                except psutil.NoSuchProcess:
                    pass
        return found

    def close(self) -> None:
        return_to_network(self.home)  # this process is not the head's to kill
        down(LAB.name)  # every process on the lab's hosts, the cluster's included


class LabBattery(Battery):
    def _kv_link_cut(self):
        def inject() -> None:
            cut(LAB.name, "prefill-1", DECODE_HOSTS)
            time.sleep(KV_CUT_S)
            restore(LAB.name, "prefill-1")
            self.notes.append(f"prefill host cut off from both decode hosts for {KV_CUT_S:.0f} s")

        return inject, None

    def _router_partition(self):
        def inject() -> None:
            cut(LAB.name, "decode-1", ["router-1"])
            time.sleep(PARTITION_S)
            restore(LAB.name, "decode-1")
            self.notes.append(f"decode-1 and the router's host apart for {PARTITION_S:.0f} s")

        return inject, None

    def _kv_loss(self):
        return self._impaired(0.0, KV_LOSS)

    def _kv_delay(self):
        return self._impaired(KV_DELAY_MS, 0.0)

    def _impaired(self, delay_ms: float, loss: float):
        """The prefill host's packets to both decode hosts, from the fault to the window's end."""

        def undo() -> None:
            restore(LAB.name, "prefill-1")
            relay = json.loads(impairment_stats(LAB.name, "prefill-1").read_text())
            self.notes.append(
                f"+{delay_ms:g} ms, {loss:.0%} loss on the KV link for {relay['seconds']} s: {relay['relayed']} packets relayed, {relay['dropped']} dropped"
            )

        return (lambda: impair(LAB.name, "prefill-1", DECODE_HOSTS, delay_ms, loss)), undo

    def _host_lost(self):
        def inject() -> None:
            crash(LAB.name, "decode-1")
            time.sleep(HOST_DOWN_S)
            boot(LAB.name, "decode-1")
            self.notes.append(f"decode-1 crashed (every process), booted {HOST_DOWN_S:.0f} s later")

        return inject, None


_REGISTRY = f"redis://{HEAD}:{REDIS_PORT}"


def _host_pid(pid: int) -> int:
    """The process's pid in its innermost PID namespace (a lab host's own)."""
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("NSpid:")).split()[-1])
