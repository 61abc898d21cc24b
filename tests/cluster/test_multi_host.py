"""A cluster across hosts, on a `pdcluster lab` (network namespaces on a bridge, each host a
Ray node with its own address and PID space): `pdcluster serve --address` from the head
places the prefill pool on the prefill host and the decode pool on the decode host, all of it
over mutual TLS. Each worker listens on its own host's address only; the KV crosses the link
between them (the decode host's eth0 receives it); the answers equal plain vLLM's. A
conversation's next turn, whose earlier turn's KV only the decode worker holds, is prefilled on
the prefill host from those blocks pulled across the link, not recomputed. A second
router on a host of its own follows the same Redis registry and gives the same answers, also while the head's Redis is gone; a
worker refuses a caller from there without the cluster's certificate. The decode host's cable is cut for 10 s
under long streams and put back: no stream is lost or changed, the controller does not replace
the worker that was only unreachable, the router has it back within seconds, and the KV comes
to rest. A rolling upgrade of the decode pool (`pdcluster restart decode --config NEW`) under
long streams loses none and changes no answer. The lab's hosts have shaped links (a token bucket), and `lab down` leaves nothing
behind. 50 ms and 5% loss on the KV link (a relay: this kernel has no netem) change no answer.
Where namespaces cannot be made (not root, no iproute2), the lab's error fails the
module."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from pdcluster.common.processes import start_process, wait_ready
from pdcluster.common.serve_process import launch_serve
from pdcluster.common.tiny_model.generate import CORPUS
from pdcluster.lab.lab_hosts import (
    boot,
    crash,
    cut,
    down,
    existing_namespaces,
    host_command,
    host_env,
    impair,
    impairment_stats,
    kill_redis,
    lab_dir,
    load,
    ray_dir,
    restore,
    start_redis,
    up,
)
from pdcluster.lab.lab_spec import RAY_PORT, REDIS_PORT, LabSpec

from tests.support.certificates import make_certificates
from tests.support.kv_at_rest import workers_at_rest
from tests.support.processes import SMALL_KV_BYTES

pytestmark = pytest.mark.slow

LAB = LabSpec(name="pdtest", subnet="10.78.0.0/24", link="2gbit", router_hosts=1)
HEAD = LAB.host("head").address
ROUTER_HOST = LAB.host("router-1").address
CERTS = lab_dir(LAB.name) / "certs"  # made when the lab is up, gone with it
MAX_TOKENS = 16
CUT_S = 10.0  # shorter than Ray's own verdict on a silent node (~15 s and more): a partition, not a host lost
UPGRADED_KV_BLOCKS = 150  # the decode pool's after its rolling upgrade
STREAM_TOKENS = 1500  # long enough to be running when the cable is cut, well after the first token
PULL_ANSWER_TOKENS = 300  # a first turn's answer: with its prompt, two full blocks on the decode worker
BLOCK = 128  # vLLM's CPU block size
KV_BYTES_PER_TOKEN = 4 * 2 * 32 * 2 * 4  # the tiny model: 4 layers x 2 KV heads x 32 dims x (K, V) x float32
STREAMS = """
import asyncio, json, sys, time, httpx
url, prompts, max_tokens, started = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
going = set()
async def stream(client, i):
    body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0, "return_tokens_as_token_ids": True}
    tokens = []
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"error": (await reply.aread()).decode()}
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk}
            tokens += [int(t.removeprefix("token_id:")) for t in chunk["choices"][0]["logprobs"]["tokens"]]
            going.add(i)
            if len(going) == len(prompts):
                open(started, "a").close()
    return {"tokens": tokens, "done_at": time.time()}
async def main():
    async with httpx.AsyncClient(timeout=300) as client:
        print(json.dumps(await asyncio.gather(*(stream(client, i) for i in range(len(prompts))))))
asyncio.run(main())
"""
LISTENING = """
import json, psutil, sys
pid = int(sys.argv[1])
pids = {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
ips = {c.laddr.ip.removeprefix("::ffff:") for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in pids}
print(json.dumps(sorted(ips)))
"""


def on_host(host: str, code: str, *args: str) -> object:
    """Runs Python `code` on a lab host (the router is reachable only from inside the lab); its
    last printed line, as JSON."""
    command = host_command(LAB.name, host, [sys.executable, "-c", code, *args])
    done = subprocess.run(command, capture_output=True, text=True, env=lab_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lab():
    up(LAB)
    try:
        yield LAB
    finally:
        down(LAB.name)


def lab_env() -> dict[str, str]:
    """A lab host's environment, whose HTTPS clients (httpx) trust the cluster's CA."""
    return {**host_env(), "SSL_CERT_FILE": str(CERTS / "ca.pem")}


@pytest.fixture(scope="module")
def certs(lab):
    CERTS.mkdir(parents=True, exist_ok=True)
    return make_certificates(CERTS, tuple(h.address for h in LAB.hosts()))


def cluster_spec(certs) -> dict:
    return {
        "name": "multihost",
        "tls": certs["member"].model_dump(),
        "engine": {"enforce_eager": True, "kv_cache_memory_bytes": SMALL_KV_BYTES},
        "prefill": {"replicas": 1, "node_resource": "prefill_pool"},
        "decode": {"replicas": 1, "node_resource": "decode_pool"},
        # Pulls from 128 tokens (one block), not the default 1024: the pull test's conversation is short.
        "router": {"bypass_prefill_below_tokens": 32, "peer_pull_min_tokens": 128},
    }


@pytest.fixture(scope="module")
def served(lab, certs, tmp_path_factory):
    spec_path = tmp_path_factory.mktemp("multihost") / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(cluster_spec(certs)))
    args = ["--config", str(spec_path), "--address", f"{HEAD}:{RAY_PORT}", "--host", HEAD, "--registry", f"redis://{HEAD}:{REDIS_PORT}"]
    _, _, record = launch_serve(args, prefix=host_command(LAB.name, "head", []), env=host_env())
    yield record
    # The lab's teardown ends the cluster with every process on its hosts.


@pytest.fixture(scope="module")
def second_router(served, certs):
    """A router on its own host, following the head's registry (membership and token)."""
    member = certs["member"]
    args = ["--host", ROUTER_HOST, "--port", "8000", "--grpc-port", "0", "--bypass-prefill-below", "32"]
    args += ["--registry", f"redis://{HEAD}:{REDIS_PORT}", "--cluster-name", "multihost"]
    args += ["--tls-cert", member.cert, "--tls-key", member.key, "--tls-ca", member.ca]
    router = start_process("router", args, env=lab_env(), prefix=host_command(LAB.name, "router-1", []))
    yield wait_ready(router).router
    # The lab's teardown ends it with every process on its host.


@pytest.fixture(scope="module")
def references(tokenizer, vllm_reference) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Prompts and vLLM's own server's greedy answers (the suite's shared one): "short" ones
    (MAX_TOKENS, to EOS), the lossy link's own "fresh" ones (MAX_TOKENS; no full block in common
    with the others, so no worker holds their prefix before) and the cut cable's "streams"
    (STREAM_TOKENS each)."""
    ids = tokenizer(CORPUS.read_text()).input_ids
    prompts = {
        "short": [ids[:400], ids[200:900]],
        "fresh": [ids[100:500], ids[300:700]],
        "streams": [ids[i * 50 : i * 50 + 40 + i] for i in range(4)],
    }
    return {
        name: (listed, vllm_reference.greedy(listed, STREAM_TOKENS if name == "streams" else MAX_TOKENS, ignore_eos=name == "streams"))
        for name, listed in prompts.items()
    }


@pytest.fixture(scope="module")
def prompts_and_answers(references) -> tuple[list[list[int]], list[list[int]]]:
    return references["short"]


def completions(router_http: str, prompts: list[list[int]], host: str = "head", max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Greedy answers of the router at `router_http`, asked from a lab host, as token ids."""
    tokens = on_host(
        host,
        "import httpx, json\n"
        f"prompts = {json.dumps(prompts)}\n"
        f"replies = [httpx.post('{router_http}/v1/completions', json={{'prompt': p, 'max_tokens': {max_tokens}, 'temperature': 0, 'ignore_eos': True, 'logprobs': 0, 'return_tokens_as_token_ids': True}}, timeout=120).json() for p in prompts]\n"
        "print(json.dumps([r['choices'][0]['logprobs']['tokens'] for r in replies]))",
    )
    return [[int(t.removeprefix("token_id:")) for t in answer] for answer in tokens]


def test_workers_serve_from_their_own_hosts_and_the_kv_crosses_the_link(served, prompts_and_answers):
    assert served.router.http == f"https://{HEAD}:8000"
    hosts = {w["role"]: w for w in cluster_workers(served.router.http)}
    assert set(hosts) == {"prefill", "decode"}
    for role, w in hosts.items():
        address = LAB.host(f"{role}-1").address
        assert w["address"].startswith(address + ":") and w["kv_endpoint"].startswith(address + ":") and w["healthy"], w
        # The worker and its engine listen on their host's address (or loopback), never on every interface.
        listening = on_host(f"{role}-1", LISTENING, str(w["pid"]))
        assert address in listening and set(listening) <= {address, "127.0.0.1"}, (role, listening)

    prompts, expected = prompts_and_answers
    received_before = link_bytes("decode-1")
    assert completions(served.router.http, prompts) == expected

    deadline = time.monotonic() + 30
    while True:  # the router's view of the worker's counters is up to a poll (1 s) old
        decode = next(w for w in cluster_workers(served.router.http) if w["role"] == "decode")
        if sum(decode["kv_transfers_by_transport"].values()) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Over NIXL, or the TCP channel where `auto` fell back for one (/cluster says which).
    by_transport = decode["kv_transfers_by_transport"]
    assert sum(by_transport.values()) == 2 and set(by_transport) <= {"nixl", "tcp"}, by_transport
    # The KV reached the decode host through its link (not shared memory), with the tokens and RPCs.
    assert link_bytes("decode-1") - received_before >= decode["kv_bytes_received"] > 0


def test_a_turn_pulls_its_earlier_turns_kv_from_the_decode_host(served, tokenizer, vllm_reference):
    """A short first turn is computed on the decode worker (under --bypass-prefill-below), so
    its answer's KV is there only. The next turn adds 100 tokens: the prefill worker on its own
    host pulls the two full blocks the decode worker holds across the link, computes the rest,
    and the answer is plain vLLM's."""
    ids = tokenizer(CORPUS.read_text()).input_ids
    first = ids[600:620]  # no other prompt here starts there
    decode_id = worker_view(served, "decode")["id"]
    known = router_view(served.router.http)["prefix_index_blocks"].get(decode_id, 0)
    (answer,) = completions(served.router.http, [first], max_tokens=PULL_ANSWER_TOKENS)
    turn = first + answer + ids[:100]
    held = (len(first) + len(answer) - 1) // BLOCK * BLOCK  # the answer's last token has no KV yet
    deadline = time.monotonic() + 30
    while (
        router_view(served.router.http)["prefix_index_blocks"].get(decode_id, 0) < known + held // BLOCK
    ):  # its KV events reach the router
        assert time.monotonic() < deadline, router_view(served.router.http)["prefix_index_blocks"]
        time.sleep(0.5)
    pulls, pulled_tokens = (
        router_metric(served, "pdcluster_router_peer_pulls_total"),
        router_metric(served, "pdcluster_router_peer_pull_tokens_total"),
    )
    prefill_before, link_before = worker_view(served, "prefill"), link_bytes("prefill-1")
    assert completions(served.router.http, [turn]) == vllm_reference.greedy([turn], MAX_TOKENS, ignore_eos=True)
    assert router_metric(served, "pdcluster_router_peer_pulls_total") == pulls + 1
    assert router_metric(served, "pdcluster_router_peer_pull_tokens_total") == pulled_tokens + held
    deadline = time.monotonic() + 30
    while worker_view(served, "prefill")["kv_bytes_received"] == prefill_before["kv_bytes_received"]:  # up to a poll old
        assert time.monotonic() < deadline, "the prefill worker received no KV"
        time.sleep(0.5)
    received = worker_view(served, "prefill")["kv_bytes_received"] - prefill_before["kv_bytes_received"]
    assert received == held * KV_BYTES_PER_TOKEN  # the held blocks, no more
    assert link_bytes("prefill-1") - link_before >= received  # through the prefill host's link


def test_a_router_on_another_host_shares_the_registry_and_mutual_tls_holds(served, second_router, prompts_and_answers):
    assert second_router.http == f"https://{ROUTER_HOST}:8000"
    prompts, expected = prompts_and_answers
    assert completions(second_router.http, prompts, host="router-1") == expected
    members = {w["id"] for w in cluster_workers(served.router.http)}
    seen = {w["id"] for w in cluster_workers(second_router.http, host="router-1")}
    assert seen == members and len(members) == 2
    # From that host, a worker refuses a caller without the cluster's certificate, TLS or not.
    worker = next(w for w in cluster_workers(served.router.http) if w["role"] == "decode")["address"]
    refused = on_host("router-1", REFUSED, worker, str(CERTS / "ca.pem"))
    assert refused == {"plaintext": "UNAVAILABLE", "no_client_cert": "UNAVAILABLE"}, refused


def test_a_router_on_another_host_serves_through_the_heads_redis_lost(served, second_router, prompts_and_answers):
    prompts, expected = prompts_and_answers
    kill_redis(LAB.name)
    try:
        answers = completions(second_router.http, prompts, host="router-1")
        workers = cluster_workers(second_router.http, host="router-1")
    finally:
        start_redis(LAB.name)  # empty: the workers announce themselves again
    assert answers == expected
    assert sorted(w["role"] for w in workers if w["healthy"]) == ["decode", "prefill"], workers


def test_a_slow_lossy_kv_link_loses_nothing(served, references):
    """50 ms more and 5% of packets lost on the way from the prefill host to the decode host: the
    KV still crosses (not recomputed) and the answers are unchanged. Prompts no worker holds: the
    decode worker would compute a prompt whose prefix it holds itself (decode_holds_prefix)."""
    prompts, expected = references["fresh"]
    transfers = kv_transfers(served)
    impair(LAB.name, "prefill-1", ["decode-1"], delay_ms=50, loss=0.05)
    try:
        rtt = on_host("prefill-1", CONNECT_TIME, LAB.host("decode-1").address, "22")  # a refused port answers at once
        answers = completions(served.router.http, prompts)
    finally:
        restore(LAB.name, "prefill-1")
    relay = json.loads(impairment_stats(LAB.name, "prefill-1").read_text())
    assert rtt >= 0.05, rtt
    assert answers == expected
    assert relay["relayed"] > 0 and relay["dropped"] > 0, relay
    deadline = time.monotonic() + 30
    while kv_transfers(served) < transfers + len(prompts):  # the router's view is up to a poll old
        assert time.monotonic() < deadline, (transfers, kv_transfers(served))
        time.sleep(0.5)
    print(f"KV link +50 ms, 5% loss: {relay['relayed']} packets relayed, {relay['dropped']} dropped; round trip {rtt * 1000:.1f} ms")


def kv_transfers(served) -> int:
    decode = next(w for w in cluster_workers(served.router.http) if w["role"] == "decode")
    return sum(decode["kv_transfers_by_transport"].values())


def streams_going(served, prompts: list[list[int]], started) -> subprocess.Popen:
    """STREAM_TOKENS-token greedy streams of the prompts from the head, once every one has its
    first tokens (`started` appears then); the client prints each stream's tokens at its end."""
    client = subprocess.Popen(
        host_command(
            LAB.name, "head", [sys.executable, "-c", STREAMS, served.router.http, json.dumps(prompts), str(STREAM_TOKENS), str(started)]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=lab_env(),
    )
    deadline = time.monotonic() + 120
    while not started.exists():
        if client.poll() is not None:
            raise AssertionError(client.stderr.read()[-3000:])
        if time.monotonic() > deadline:
            client.kill()
            raise AssertionError("no tokens")
        time.sleep(0.05)
    return client


def test_a_cut_cable_loses_no_stream_and_replaces_no_worker(served, references, tmp_path):
    prompts, expected = references["streams"]
    before = {w["role"]: w for w in cluster_workers(served.router.http)}
    client = streams_going(served, prompts, tmp_path / "started")
    try:
        cut(LAB.name, "decode-1", [])
        time.sleep(CUT_S)
        restore(LAB.name, "decode-1")
        restored = time.time()
        back_after = healthy_again_after(served, restored)
        out, err = client.communicate(timeout=300)
    finally:
        restore(LAB.name, "decode-1")
        client.kill()
    assert client.returncode == 0, err[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    assert all("tokens" in r for r in results), results
    assert all(r["done_at"] > restored for r in results)  # every stream ran through the cut
    assert [r["tokens"] for r in results] == expected  # 0 lost, 0 wrong
    # Back within the channels' reconnect backoff (2 s at most), not gRPC's default 120 s.
    assert back_after < 30, back_after
    after = {w["role"]: w for w in workers_at_rest(lambda: cluster_workers(served.router.http))}
    # Only unreachable: the same workers, none replaced, the KV at rest.
    assert {r: (w["id"], w["pid"]) for r, w in after.items()} == {r: (w["id"], w["pid"]) for r, w in before.items()}
    status = on_host("head", STATUS)
    assert status["heals"] == [] and all(r["cut_off"] == "" for r in status["replicas"]), status
    resumes = router_metric(served, "pdcluster_router_resumes_total")
    print(f"decode host cut {CUT_S:.0f} s: healthy again {back_after:.1f} s after its cable came back; streams resumed: {resumes}")


def test_a_rolling_upgrade_of_the_decode_pool_loses_no_stream(served, certs, references, prompts_and_answers, tmp_path):
    """`pdcluster restart decode --config NEW` from the head, under long streams: the decode
    host's one worker drains (its streams finish there), the replacement runs the new spec's
    engine on the same host, and every answer is exact, before and after."""
    prompts, expected = references["streams"]
    (old,) = [w for w in cluster_workers(served.router.http) if w["role"] == "decode"]
    upgraded = cluster_spec(certs)
    upgraded["decode"]["engine"] = {"num_gpu_blocks_override": UPGRADED_KV_BLOCKS}
    spec_path = tmp_path / "upgraded.yaml"
    spec_path.write_text(yaml.safe_dump(upgraded))
    client = streams_going(served, prompts, tmp_path / "started")
    try:
        restart = [sys.executable, "-m", "pdcluster", "restart", "decode", "--config", str(spec_path)]
        restart += ["--address", f"{HEAD}:{RAY_PORT}", "--name", "multihost"]
        done = subprocess.run(host_command(LAB.name, "head", restart), capture_output=True, text=True, env=lab_env(), timeout=600)
        out, err = client.communicate(timeout=300)
    finally:
        client.kill()
    assert done.returncode == 0 and "decode pool restarted: 1 replicas replaced" in done.stdout, done.stderr[-3000:]
    assert client.returncode == 0, err[-3000:]
    assert [r.get("tokens") for r in json.loads(out.strip().splitlines()[-1])] == expected  # they ran through the drain
    (new,) = [w for w in workers_at_rest(lambda: cluster_workers(served.router.http)) if w["role"] == "decode"]
    assert new["id"] != old["id"] and new["address"].startswith(LAB.host("decode-1").address + ":")
    assert new["total_kv_blocks"] == UPGRADED_KV_BLOCKS != old["total_kv_blocks"]  # the new spec's engine
    short, answers = prompts_and_answers
    assert completions(served.router.http, short) == answers  # on the upgraded worker


def test_a_crashed_host_loses_every_process_and_boots_back_into_the_cluster(served, second_router):
    init_pid = load(LAB.name)[1]["router-1"]
    assert on_host("head", ALIVE_NODES) == len(LAB.hosts())
    crash(LAB.name, "router-1")  # the second router's host: every process on it at once
    assert not alive(init_pid)
    deadline = time.monotonic() + 120
    while on_host("head", ALIVE_NODES) != len(LAB.hosts()) - 1:  # Ray sees its node gone
        assert time.monotonic() < deadline, "Ray did not see the crashed host's node go"
        time.sleep(1)
    boot(LAB.name, "router-1")
    assert load(LAB.name)[1]["router-1"] != init_pid
    assert on_host("head", ALIVE_NODES) == len(LAB.hosts())  # a fresh node on the same address


def test_the_links_are_shaped_and_down_leaves_nothing(lab):
    qdisc = subprocess.run(
        host_command(LAB.name, "decode-1", ["tc", "qdisc", "show", "dev", "eth0"]), capture_output=True, text=True
    ).stdout
    assert "tbf" in qdisc and "rate 2Gbit" in qdisc, qdisc
    inits = load(LAB.name)[1]
    assert existing_namespaces(LAB.name) == sorted(f"{LAB.name}-{h}" for h in ("head", "prefill-1", "decode-1", "router-1", "switch"))
    assert (ray_dir(LAB.name) / "session_latest").exists()  # the lab's Ray kept to the lab's own directory
    down(LAB.name)  # (last in the module; the fixture's own down then finds nothing)
    assert existing_namespaces(LAB.name) == [] and not any(alive(pid) for pid in inits.values())
    assert not lab_dir(LAB.name).exists()


CONNECT_TIME = """
import socket, sys, time
started = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()
except ConnectionRefusedError:
    pass
print(time.monotonic() - started)
"""
REFUSED = """
import grpc, json, sys
from pdcluster.protos import worker_pb2, worker_pb2_grpc
address, ca = sys.argv[1], open(sys.argv[2], "rb").read()
def code(channel):
    try:
        worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=10)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
print(json.dumps({"plaintext": code(grpc.insecure_channel(address)),
                  "no_client_cert": code(grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca)))}))
"""
ALIVE_NODES = f"""
import os, ray
ray.init(address="{HEAD}:{RAY_PORT}", log_to_driver=False)
print(sum(n["Alive"] for n in ray.nodes()), flush=True)
os._exit(0)  # before Ray's exit handlers, which may print after the answer
"""
STATUS = f"""
import json, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pdcluster", "status", "--json", "--name", "multihost", "--address", "{HEAD}:{RAY_PORT}"],
                     capture_output=True, text=True, timeout=120)
print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else json.dumps({{"error": out.stderr[-2000:]}}))
"""


def router_view(http: str, host: str = "head") -> dict:
    """The whole `/cluster` of the router at `http`, asked from a lab host."""
    return on_host(host, f"import httpx, json; print(json.dumps(httpx.get('{http}/cluster', timeout=30).json()))")


def worker_view(served, role: str) -> dict:
    return next(w for w in cluster_workers(served.router.http) if w["role"] == role)


def router_metric(served, name: str) -> float:
    """The sum of a metric's samples on the head router's `/metrics`, asked from the head."""
    return on_host(
        "head",
        f"import httpx; print(sum(float(l.split()[-1]) for l in httpx.get('{served.router.http}/metrics').text.splitlines() if l.startswith('{name}')))",
    )


def cluster_workers(http: str, host: str = "head") -> list[dict]:
    """The workers the router at `http` lists in its `/cluster`, asked from a lab host."""
    return router_view(http, host)["workers"]


def healthy_again_after(served, since: float) -> float:
    """Seconds from `since` until the router has every worker healthy again."""
    waiting = f"""
import httpx, json, time
while not all(w["healthy"] for w in httpx.get("{served.router.http}/cluster", timeout=30).json()["workers"]):
    time.sleep(0.2)
print(time.time())
"""
    return on_host("head", waiting) - since


def link_bytes(host: str) -> int:
    """Bytes the host's eth0 has received."""
    return int(on_host(host, "print(open('/sys/class/net/eth0/statistics/rx_bytes').read().strip())"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
