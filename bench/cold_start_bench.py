"""`pdcluster bench coldstart`: what a scale-up costs, from the decision to the new replica's
first served token, phase by phase, beside the bare vLLM engine's own start.

The ceiling, measured first on the idle machine: a fresh process that imports vLLM, starts
AsyncLLM on the same engine arguments (no connector) and generates one token
(`bare_engine_start`). Then a local `pdcluster serve` (1 prefill, 1 decode, each pool able to
grow to 2) takes sequential requests of fresh random prompts, a quarter second apart, each long
enough to be prefilled remotely, while `pdcluster scale` moves one pool from 1 replica to 2; the
new replica's marks (the controller's decision, its actor's placement, its worker's process and
engine, the router's membership, first route and first token) give its phases
(`start_phases`). The pool goes back to 1 and the next round starts; the medians are printed
beside the bare start and their ratio."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import httpx
import yaml

from pdcluster.cluster.cluster_status import ClusterStatus
from pdcluster.common.serve_process import launch_serve, stop_serve
from pdcluster.common.start_marks import PHASES, start_phases
from pdcluster.common.worker_record import ROLES
from pdcluster.router.cluster_view import ClusterView
from pdcluster.worker.config import EngineConfig
from pdcluster.worker.engine_args import engine_environment, engine_kwargs

NAME = "coldstart"
PROMPT_TOKENS = 64  # above the spec's bypass threshold: each prompt goes to a prefill worker
PACE_S = 0.25  # between requests: the new replica's start has the machine as the bare engine's has
WAIT_S = 600.0  # for one replica to start and serve, on a busy small machine


def bare_engine_start(engine: EngineConfig) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "pdcluster.bench.bare_engine_start", json.dumps(engine_kwargs(engine))],
        env={**os.environ, **engine_environment(engine)},
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the bare vLLM engine did not start:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Requests:
    """One request at a time, PACE_S apart, each a fresh random prompt (no prefix cache, no
    prefix affinity)."""

    def __init__(self, url: str) -> None:
        self._url, self._stop = url, threading.Event()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=self._url, timeout=120) as http:
            while not self._stop.is_set():
                prompt = [rng.randrange(10, 900) for _ in range(PROMPT_TOKENS)]
                reply = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
                if reply.status_code != 200:
                    self.errors.append(reply.text[:300])
                self._stop.wait(PACE_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(180)


class ColdStartCluster:
    def __init__(self, engine: EngineConfig) -> None:
        spec = {
            "name": NAME,
            "engine": engine.model_dump(exclude_defaults=True),
            "prefill": {"replicas": 1, "max_replicas": 2},
            "decode": {"replicas": 1, "max_replicas": 2},
            "router": {"port": 0, "grpc_port": 0, "bypass_prefill_below_tokens": PROMPT_TOKENS // 2},
        }
        path = os.path.join(tempfile.mkdtemp(prefix="pdcluster-coldstart-"), "cluster.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(spec, f)
        self.proc, self.lines, served = launch_serve(["--config", path])
        self.url, self.ray_address = served.router.http, served.ray_address

    def pdcluster(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "pdcluster", *args, "--name", NAME, "--address", self.ray_address]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"pdcluster {' '.join(args)} failed:\n{out.stderr[-2000:]}")
        return out.stdout

    def view(self) -> ClusterView:
        return ClusterView.model_validate(httpx.get(self.url + "/cluster", timeout=30).json())

    def status(self) -> ClusterStatus:
        return ClusterStatus.model_validate_json(self.pdcluster("status", "--json").strip().splitlines()[-1])

    def scale_up_once(self, role: str) -> dict[str, float]:
        """Scale `role` from 1 to 2 under sequential requests; the new replica's phases. Back to 1 after."""
        before = {w.address for w in self.view().workers}
        with Requests(self.url) as requests:
            self.pdcluster("scale", role, "2")
            new = self._wait_for(
                lambda: [w for w in self.view().workers if w.address not in before and w.first_token_at],
                f"a first token from a new {role} replica (request errors: {requests.errors[:3]})",
            )
        if requests.errors:
            raise RuntimeError(f"requests failed while the {role} pool grew: {requests.errors[:3]}")
        worker = new[0]
        replica = next(r for r in self.status().replicas if r.address == worker.address)
        assert replica.start is not None, replica
        phases = start_phases(replica.decided_at, replica.start, worker.joined_at, worker.first_routed_at, worker.first_token_at)
        self.pdcluster("scale", role, "1")
        self._wait_for(lambda: sum(w.role == role for w in self.view().workers) == 1, f"the {role} pool back to 1")
        return phases

    def _wait_for(self, predicate, what: str):
        """The predicate's first true value, polled every half second for up to WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {WAIT_S:.0f}s waiting for {what}")
            time.sleep(0.5)
        return value

    def close(self) -> None:
        stop_serve(self.proc)


def _median_phases(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {phase: round(statistics.median(r[phase] for r in rounds), 2) for phase in rounds[0]}


def main(engine: EngineConfig, roles: Sequence[str] = ROLES, rounds: int = 2, json_output: bool = False) -> dict:
    bare = [bare_engine_start(engine) for _ in range(rounds)]
    bare_s = statistics.median(b["first_token_s"] for b in bare)
    print(
        f"bare vLLM engine, process start to first token: {bare_s:.2f} s (imports {statistics.median(b['imports_s'] for b in bare):.2f} s)"
    )
    cluster = ColdStartCluster(engine)
    measured: dict[str, dict[str, float]] = {}
    try:
        for role in roles:
            measured[role] = _median_phases([cluster.scale_up_once(role) for _ in range(rounds)])
    finally:
        cluster.close()
    print(f"{'phase (median s)':<18}" + "".join(f"{role:>10}" for role in measured))
    for phase in (*PHASES, "total"):
        print(f"{phase:<18}" + "".join(f"{measured[role][phase]:>10.2f}" for role in measured))
    print(f"{'bare vLLM':<18}" + "".join(f"{bare_s:>10.2f}" for _ in measured))
    print(f"{'ratio (goal 1.5)':<18}" + "".join(f"{measured[role]['total'] / bare_s:>10.2f}" for role in measured))
    report = {
        "bare_vllm_s": round(bare_s, 2),
        "bare_vllm": bare,
        "phases": measured,
        "ratio": {role: round(measured[role]["total"] / bare_s, 2) for role in measured},
        "rounds": rounds,
    }
    if json_output:
        print(json.dumps(report))
    return report
