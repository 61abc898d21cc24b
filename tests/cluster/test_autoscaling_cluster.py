"""The whole autoscaling loop on Ray's fake autoscaling cluster (one machine, fake nodes), on
each signal. On the SLO signal, a prefill burst (prompts later than the TTFT SLO) adds a
prefill replica and a node of the prefill type, and idle time removes them. On the queue
signal, the decode pool scales on its own load (running requests per replica) and back, the
prefill pool untouched."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable

import httpx
import pytest
import yaml

from pdcluster.common.serve_process import launch_serve, stop_serve
from pdcluster.common.tiny_model.generate import BENCH_MODEL, CORPUS, ensure_tiny_model

from tests.support.paths import ROOT

pytestmark = pytest.mark.slow

# Ray's wheel lacks the fake provider's base config that AutoscalingCluster reads; this is it.
FAKE_BASE_CONFIG = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}

# One node of each type from the start (a pool's first replica then waits for no node launch,
# twice in this module); the tests scale each pool to a second node and back.
NODE_TYPES = {
    "prefill_node": {
        "resources": {"CPU": 1, "prefill_pool": 1, "object_store_memory": 200_000_000},
        "node_config": {},
        "min_workers": 1,
        "max_workers": 2,
    },
    "decode_node": {
        "resources": {"CPU": 1, "decode_pool": 1, "object_store_memory": 200_000_000},
        "node_config": {},
        "min_workers": 1,
        "max_workers": 2,
    },
}

SPEC = {
    "name": "autoscale-test",
    "ray_address": "auto",
    # A replica added under load must start in bounded time on 2 busy cores with a cold
    # compile cache (as in CI); compiling the model is not what this test is about.
    "engine": {"enforce_eager": True},
    "prefill": {"replicas": 1, "min_replicas": 1, "max_replicas": 2, "node_resource": "prefill_pool"},
    "decode": {"replicas": 1, "min_replicas": 1, "max_replicas": 2, "node_resource": "decode_pool"},
    "router": {
        "bypass_prefill_below_tokens": 16,
        # SLO autoscaling predicts from a profile (the bench model's, which the SLO test serves).
        "profile": str(ROOT / "bench" / "profiles" / "cpu1-bench-llama.json"),
        # Under the profile's own time for one of the SLO test's prompts (~0.5 s): every burst
        # misses it, however fast this machine runs them.
        "slo": {"ttft_ms": 300, "itl_ms": 40},
    },
    "autoscaling": {
        "enabled": True,
        "signal": "slo",
        "interval_s": 1,
        "upscale_delay_s": 2,
        "downscale_delay_s": 8,
        "cooldown_s": 4,
        "decode_target_kv_usage": 0.9,
    },
}


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    from ray.cluster_utils import AutoscalingCluster

    class PdAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kwargs):
            config = dict(FAKE_BASE_CONFIG, available_node_types=dict(worker_node_types))
            config["available_node_types"]["ray.head.default"] = {"resources": head_resources, "node_config": {}, "max_workers": 0}
            return config

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # AutoscalingCluster runs the `ray` command: the venv's, found on PATH.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    assert shutil.which("ray")
    cluster = PdAutoscalingCluster(head_resources={"CPU": 1}, worker_node_types=NODE_TYPES)
    cluster.start(override_env={"RAY_AUTH_MODE": "disabled"})
    try:
        yield
    finally:
        cluster.shutdown()


def spec_for(signal: str) -> dict:
    spec = json.loads(json.dumps(SPEC))
    spec["router"].update(port=0, grpc_port=0)
    spec["autoscaling"]["signal"] = signal
    if signal == "slo":
        # The model the profile describes: its 1500-token prompts take about half a second (the
        # tiny model's ~0.05 s, inside any SLO), so a burst of them misses the TTFT SLO.
        spec["engine"]["model"] = str(ensure_tiny_model(spec=BENCH_MODEL))
        # Every prompt to the prefill pool: with the profile the router would keep prompts on an
        # idle decode worker, and the burst would never reach the pool that should grow.
        spec["router"]["local_prefill_above_queued_tokens"] = 1_000_000
    if signal == "queue":
        spec["autoscaling"]["decode_target_running"] = 4  # the decode test's 10 clients overload one replica
    return spec


@pytest.fixture
def serve(request, fake_cluster, tmp_path):
    """`pdcluster serve` of SPEC on the autoscaling signal the test names (indirect param)."""
    spec_path = tmp_path / "cluster.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(request.param)))
    proc, lines, served = launch_serve(["--config", str(spec_path)])
    import ray

    ray.init(address="auto", namespace="pdcluster", log_to_driver=False)
    controller = ray.get_actor("autoscale-test-controller", namespace="pdcluster")
    SERVED.update(url=served.router.http, output=lines)
    yield controller, served.router.http
    ray.shutdown()
    stop_serve(proc)


SERVED: dict = {}  # the running serve's URL and output lines, quoted when a wait fails


def status(controller) -> dict:
    """The controller's status as `pdcluster status --json` prints it."""
    import ray

    return ray.get(controller.status.remote()).model_dump(mode="json")


def pool_nodes(resource: str) -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource))


def wait_until(predicate, timeout_s: float, what: str, controller, load: Load | None = None):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, failure_report(what, controller, load)
        time.sleep(1)


def failure_report(what: str, controller, load: Load | None) -> str:
    """What a failed wait saw: the controller's status, the router's own view of its workers,
    what the load got back, and the end of serve's output (the router logs there)."""
    try:
        router_view = httpx.get(f"{SERVED['url']}/cluster", timeout=10).text
    except httpx.HTTPError as e:
        router_view = repr(e)
    return "\n".join(
        [
            what,
            "controller: " + json.dumps(status(controller))[:3000],
            "router /cluster: " + router_view[:3000],
            "load: " + (load.summary() if load else "none"),
            "serve output:",
            *SERVED["output"][-40:],
        ]
    )


class Load:
    """Client threads sending requests (each `next_body()`) in a loop until stopped."""

    def __init__(self, url: str, next_body: Callable[[], dict], clients: int) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(url, next_body), daemon=True) for _ in range(clients)]
        self.statuses: list[int] = []
        self.errors: list[str] = []  # bodies of non-200 answers, and exceptions
        self.in_flight = 0

    def _loop(self, url: str, next_body: Callable[[], dict]) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while not self._stop.is_set():
                self.in_flight += 1
                try:
                    response = http.post("/v1/completions", json=next_body())
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))
                    continue
                finally:
                    self.in_flight -= 1
                self.statuses.append(response.status_code)
                if response.status_code != 200:
                    self.errors.append(response.text[:300])

    def summary(self) -> str:
        return f"{len(self.statuses)} answered {sorted(set(self.statuses))}, {self.in_flight} in flight, errors {self.errors[:3]}"

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(600)


@pytest.mark.timeout(1800)  # its waits add up to more than the suite's per-test 900 s
@pytest.mark.parametrize("serve", ["slo"], indirect=True)
def test_prefill_burst_adds_replica_and_node_then_idle_removes_them(serve):
    from transformers import AutoTokenizer

    controller, url = serve
    assert pool_nodes("prefill_pool") == 1 and pool_nodes("decode_pool") == 1
    corpus = AutoTokenizer.from_pretrained(ensure_tiny_model(spec=BENCH_MODEL))(CORPUS.read_text()).input_ids[:1500]
    rng = random.Random(0)

    def prompt_nobody_sent() -> dict:
        # A fresh first block: no prefix cache spares the prompt its prefill.
        return {"prompt": [rng.randrange(10, 900) for _ in range(32)] + corpus[32:], "max_tokens": 1, "temperature": 0}

    # One request through the whole path first, however long a cold start makes it: the
    # scale-up wait below times the autoscaler, not the first request.
    first = httpx.post(url + "/v1/completions", json=prompt_nobody_sent(), timeout=600)
    assert first.status_code == 200, first.text
    with Load(url, prompt_nobody_sent, clients=6) as load:
        wait_until(lambda: status(controller)["pools"]["prefill"]["target"] == 2, 120, "prefill scale-up decision", controller, load)
    assert load.statuses and set(load.statuses) == {200}, load.summary()
    # The burst is over, but the pool holds while its new replica starts (on 2 cores it starts
    # in minutes under load, so the test lets it start idle).
    wait_until(lambda: status(controller)["pools"]["prefill"]["ready"] == 2, 600, "second prefill replica", controller)
    assert pool_nodes("prefill_pool") == 2  # Ray's autoscaler added a node of the prefill type
    decisions = status(controller)["decisions"]
    assert [(d["role"], d["from_replicas"], d["to_replicas"]) for d in decisions] == [("prefill", 1, 2)]  # decode untouched

    wait_until(lambda: status(controller)["pools"]["prefill"]["target"] == 1, 120, "prefill scale-down decision", controller)
    wait_until(lambda: sum(r["role"] == "prefill" for r in status(controller)["replicas"]) == 1, 120, "drained replica removed", controller)
    wait_until(lambda: pool_nodes("prefill_pool") == 1, 120, "idle prefill node removed", controller)
    assert [(d["role"], d["to_replicas"]) for d in status(controller)["decisions"]][-1] == ("prefill", 1)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("serve", ["queue"], indirect=True)
def test_decode_scales_on_its_own_queue(serve, tokenizer):
    controller, url = serve
    body = {"prompt": "The old mill stands by the river", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with Load(url, lambda: body, clients=10) as load:
        wait_until(lambda: status(controller)["pools"]["decode"]["target"] == 2, 120, "decode scale-up decision", controller, load)
    assert load.statuses and set(load.statuses) == {200}, load.summary()
    wait_until(lambda: status(controller)["pools"]["decode"]["ready"] == 2, 600, "second decode replica", controller)
    assert pool_nodes("decode_pool") == 2
    decisions = [(d["role"], d["from_replicas"], d["to_replicas"]) for d in status(controller)["decisions"]]
    assert decisions == [("decode", 1, 2)]  # prefill untouched
    wait_until(lambda: status(controller)["pools"]["decode"]["target"] == 1, 120, "decode scale-down decision", controller)
