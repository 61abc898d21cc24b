"""`pdcluster serve` on a local Ray: pools as Ray actors, the controller healing a killed
decode worker while requests stream (none lost, vLLM's own text, its engine gone with it, every
KV block free after), `pdcluster status` with the replacement's cold start by phase, a second
model with pools of its own behind the same endpoint (each model's answers its own vLLM's), and
a clean shutdown that leaves no process behind."""

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
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vllm.entrypoints.serve.exception_handling.utils import sanitize_message

from pdcluster.cluster.cluster_status import ClusterStatus
from pdcluster.common.ports import free_port
from pdcluster.common.serve_process import launch_serve, stop_serve
from pdcluster.common.start_marks import PHASES, start_phases
from pdcluster.common.tiny_model.generate import CORPUS, OTHER_MODEL, ensure_tiny_model
from pdcluster.common.vllm_args import engine_args_from_flags
from pdcluster.common.vllm_server import start_vllm_server
from pdcluster.common.worker_record import Role
from pdcluster.protos import inference_pb2 as ipb
from pdcluster.protos import inference_pb2_grpc as igrpc
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc
from pdcluster.worker.config import EngineConfig
from pdcluster.worker.engine_args import engine_environment

from tests.support.kv_at_rest import workers_at_rest
from tests.support.paths import ROOT
from tests.support.processes import EAGER, SMALL_KV
from tests.support.vllm_reference import ENGINE_FLAGS

pytestmark = pytest.mark.slow

MAX_TOKENS = 200
PREFILL_KV_BLOCKS = 100  # room for every prompt here, and unlike the default
SECOND = "small"  # the second model's served name
# The second model's engine, here and in its vLLM reference: float32 to compare tokens.
SECOND_ENGINE = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-model-len", "4096", "--max-num-seqs", "64"]


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """`pdcluster serve --prefill 2 --decode 1` on free ports, and a second model (other
    weights) co-located on a decode worker of its own, from the spec's `models:`."""
    # The prefill pool's own engine flags, which must reach its engines and only theirs.
    prefill_args = ["--prefill-args", f"--num-gpu-blocks-override {PREFILL_KV_BLOCKS}"]
    second = {"name": SECOND, "engine": {"model": str(ensure_tiny_model(spec=OTHER_MODEL)), **engine_args_from_flags(SECOND_ENGINE)[0]}}
    spec = tmp_path_factory.mktemp("spec") / "models.yaml"
    # `auto`: the second model for short prompts and for the header, else the first, overflowing to the second.
    auto = {
        "name": "auto",
        "rules": [
            {"name": "short", "model": SECOND, "max_prompt_tokens": 8},
            {"name": "cheap", "model": SECOND, "headers": {"x-tier": "cheap"}},
        ],
        "default": str(ensure_tiny_model()),
        "overflow": SECOND,
        "overflow_at_inflight": 1,
    }
    models = [{**second, "prefill": {"replicas": 0}, "decode": {"replicas": 1}}]
    spec.write_text(yaml.safe_dump({"models": models, "router": {"aliases": [auto]}}))
    # A dead Ray head's address, as one killed without `ray stop` leaves: a local cluster starts its own Ray.
    dead_head = {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    shape = ["--prefill", "2", "--decode", "1", "--port", "0", "--grpc-port", "0", "--config", str(spec)]
    proc, lines, served = launch_serve(
        [*shape, *prefill_args, *ENGINE_FLAGS, *EAGER, *SMALL_KV],
        env=dead_head,
    )
    yield proc, served.router.http, lines
    stop_serve(proc)


@pytest.fixture(scope="module")
def second_reference(tmp_path_factory):
    """vLLM's own server on the second model, run as the cluster runs it."""
    directory = tmp_path_factory.mktemp("vllm-second")
    model = str(ensure_tiny_model(spec=OTHER_MODEL))
    env = {**os.environ, **engine_environment(EngineConfig())}
    server, url = start_vllm_server(["--model", model, "--served-model-name", SECOND, *SECOND_ENGINE], env, str(directory / "vllm.log"))
    yield url
    server.stop()


def cluster_workers(url: str, model: str = "") -> list[dict]:
    """The workers of one model (default: the first)."""
    view = httpx.get(url + "/cluster", timeout=30).json()
    ids = set(view["models"][model or view["model"]])
    return [w for w in view["workers"] if w["id"] in ids]


def listening_addresses(pid: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Where a process and its children (the vLLM engine, which serves the KV endpoint) listen."""
    pids = {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    listening = {
        ipaddress.ip_address(c.laddr.ip) for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
    }
    return {getattr(ip, "ipv4_mapped", None) or ip for ip in listening}


def test_serve_starts_pools_and_heals_a_killed_decode_worker(serve, tokenizer, vllm_reference):
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
    # The first model's answers are its own vLLM's, token for token (float32 on both sides).
    assert expected == vllm_reference.greedy([list(r.prompt_token_ids) for r in requests], MAX_TOKENS, ignore_eos=True)

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


def test_a_second_model_has_its_own_pools_behind_the_same_endpoint(serve, second_reference, vllm_reference, tokenizer):
    proc, url, lines = serve
    view = httpx.get(url + "/cluster", timeout=30).json()
    first = view["model"]
    assert list(view["models"]) == [first, SECOND]
    # Co-located: one decode worker of its own, no prefill pool; the first model's workers are not its.
    assert [w["role"] for w in cluster_workers(url, SECOND)] == ["decode"]
    assert not set(view["models"][first]) & set(view["models"][SECOND])
    # /v1/models lists both; the second's card is the one vLLM's own server gives.
    listed = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    (reference_card,) = httpx.get(second_reference + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == [first, SECOND, "auto"]  # and the alias
    card_fields = ("id", "object", "owned_by", "root", "parent", "max_model_len")
    assert {k: listed[1][k] for k in card_fields} == {k: reference_card[k] for k in card_fields}

    ids = tokenizer(CORPUS.read_text()).input_ids
    prompts = [ids[i * 97 : i * 97 + 60] for i in range(3)]
    with httpx.Client(timeout=120) as http:

        def completion(base: str, model: str, prompt: list[int]) -> list[int]:
            body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
            response = http.post(base + "/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["token_ids"]

        # Each request runs on the pools of the model it names: the second's answers are its vLLM's, token for token.
        expected = [completion(second_reference, SECOND, p) for p in prompts]
        assert [completion(url, SECOND, p) for p in prompts] == expected
        firsts = [completion(url, first, p) for p in prompts]
        assert firsts == vllm_reference.greedy(prompts, 24, ignore_eos=True) and firsts != expected  # the weights differ
        chat = {"model": SECOND, "messages": [{"role": "user", "content": "The river"}], "max_tokens": 16, "temperature": 0}
        reference_chat = http.post(second_reference + "/v1/chat/completions", json=chat).json()
        assert http.post(url + "/v1/chat/completions", json=chat).json()["choices"] == reference_chat["choices"]
        # An unknown model: vLLM's own 404, naming every model served here.
        unknown = {"model": "nope", "prompt": "The river", "max_tokens": 2}
        ours, theirs = http.post(url + "/v1/completions", json=unknown), http.post(second_reference + "/v1/completions", json=unknown)
        assert ours.status_code == theirs.status_code == 404
        # (vLLM's messages hide file paths, the first model's name here)
        theirs_here = theirs.text.replace(f"Valid aliases: {SECOND}.", f"Valid aliases: {sanitize_message(first)}, {SECOND}, auto.")
        assert ours.json() == json.loads(theirs_here) and theirs_here != theirs.text

        # The alias, each answer naming the model that gave it: a short prompt, the header, the default.
        def auto(prompt, headers: dict | None = None) -> str:
            body = {"model": "auto", "prompt": prompt, "max_tokens": 4, "temperature": 0}
            response = http.post(url + "/v1/completions", json=body, headers=headers or {})
            assert response.status_code == 200, response.text
            return response.json()["model"]

        assert auto("The river") == SECOND
        assert auto(prompts[0], {"X-Tier": "cheap"}) == SECOND
        assert auto(prompts[0]) == first
        # Overflow: while a stream runs on the first model (saturated at one request running), the second answers.
        busy = {"model": first, "prompt": prompts[1], "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with http.stream("POST", url + "/v1/completions", json=busy) as running:
            chunks = running.iter_lines()  # kept: a dropped iterator closes the response
            next(chunks)  # streaming: it holds its slot until it ends, or its client leaves
            assert auto(prompts[0]) == SECOND
        idle = f'pdcluster_router_inflight_requests{{model_name="{first}"}} 0.0'
        deadline = time.monotonic() + 60
        while idle not in http.get(url + "/metrics").text and time.monotonic() < deadline:  # the left stream's abort
            time.sleep(0.2)
        assert auto(prompts[0]) == first
        metrics = http.get(url + "/metrics").text
    decisions = {
        (m["model"], m["rule"]): float(m["n"])
        for m in re.finditer(
            r'pdcluster_router_alias_decisions_total{alias="auto",model="(?P<model>[^"]+)",rule="(?P<rule>[^"]+)"} (?P<n>\S+)', metrics
        )
    }
    assert decisions == {(SECOND, "short"): 1, (SECOND, "cheap"): 1, (first, "default"): 2, (SECOND, "overflow"): 1}, decisions
    # The router's series carry the model they count.
    assert re.search(rf'pdcluster_router_requests_total{{[^}}]*model_name="{SECOND}"', metrics), metrics[-2000:]
    # The gRPC API dispatches by the request's model too.
    with grpc.insecure_channel(grpc_address(lines)) as channel:
        stub = igrpc.InferenceStub(channel)
        reply = stub.Complete(
            ipb.GenerateRequest(model=SECOND, prompt_token_ids=prompts[0], max_tokens=24, temperature=0.0, ignore_eos=True)
        )
        assert list(reply.token_ids) == expected[0]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Complete(ipb.GenerateRequest(model="nope", prompt="The river", max_tokens=2))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in refused.value.details()
    # `pdcluster status` shows each model's pools, under its own controller.
    status = subprocess.run([sys.executable, "-m", "pdcluster.cli", "status"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert re.findall(r"^cluster (\S+)", status.stdout, re.M) == ["pdcluster", f"pdcluster-{SECOND}"], status.stdout


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
    workers = [psutil.Process(w["pid"]) for w in httpx.get(url + "/cluster", timeout=30).json()["workers"]]  # both models
    assert len(started) > len(workers)  # Ray's processes, the actors, the workers and their engines
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(180) == 0, "".join(lines[-30:])
    gone, alive = psutil.wait_procs(started + workers, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [(p.pid, p.cmdline()[:3]) for p in alive]
