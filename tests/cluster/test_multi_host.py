"""A cluster across hosts, on a `pdcluster lab` (network namespaces on a bridge, each host a
Ray node with its own address and PID space): `pdcluster serve --address` from the head
places the prefill pool on the prefill host and the decode pool on the decode host. Each worker
listens on its own host's address only; the KV crosses the link between them (the decode host's
eth0 receives it); the answers equal plain vLLM's. The lab's hosts have shaped links
(a token bucket), and `lab down` leaves nothing behind. Where namespaces cannot be made (not
root, no iproute2), the lab's error fails the module."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest
import yaml

from pdcluster.common.serve_process import launch_serve
from pdcluster.common.tiny_model.generate import CORPUS
from pdcluster.lab.lab_hosts import down, existing_namespaces, host_command, host_env, lab_dir, load, ray_dir, up
from pdcluster.lab.lab_spec import RAY_PORT, REDIS_PORT, LabSpec

from tests.support.processes import reference_outputs

pytestmark = pytest.mark.slow

LAB = LabSpec(name="pdtest", subnet="10.78.0.0/24", link="2gbit")
HEAD = LAB.host("head").address
MAX_TOKENS = 16
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
    done = subprocess.run(command, capture_output=True, text=True, env=host_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lab():
    up(LAB)
    try:
        yield LAB
    finally:
        down(LAB.name)


@pytest.fixture(scope="module")
def served(lab, tmp_path_factory):
    spec = {
        "name": "multihost",
        "engine": {"enforce_eager": True},
        "prefill": {"replicas": 1, "node_resource": "prefill_pool"},
        "decode": {"replicas": 1, "node_resource": "decode_pool"},
        "router": {"bypass_prefill_below_tokens": 32},
    }
    spec_path = tmp_path_factory.mktemp("multihost") / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    args = ["--config", str(spec_path), "--address", f"{HEAD}:{RAY_PORT}", "--host", HEAD, "--registry", f"redis://{HEAD}:{REDIS_PORT}"]
    _, _, record = launch_serve(args, prefix=host_command(LAB.name, "head", []), env=host_env())
    yield record
    # The lab's teardown ends the cluster with every process on its hosts.


def test_workers_serve_from_their_own_hosts_and_the_kv_crosses_the_link(served, tokenizer, tmp_path):
    assert served.router.http == f"http://{HEAD}:8000"
    workers = on_host(
        "head", f"import httpx; print(__import__('json').dumps(httpx.get('{served.router.http}/cluster', timeout=30).json()['workers']))"
    )
    hosts = {w["role"]: w for w in workers}
    assert set(hosts) == {"prefill", "decode"}
    for role, w in hosts.items():
        address = LAB.host(f"{role}-1").address
        assert w["address"].startswith(address + ":") and w["kv_endpoint"].startswith(address + ":") and w["healthy"], w
        # The worker and its engine listen on their host's address (or loopback), never on every interface.
        listening = on_host(f"{role}-1", LISTENING, str(w["pid"]))
        assert address in listening and set(listening) <= {address, "127.0.0.1"}, (role, listening)

    ids = tokenizer(CORPUS.read_text()).input_ids
    prompts = [ids[:400], ids[200:900]]
    received_before = link_bytes("decode-1")
    answers = on_host(
        "head",
        "import httpx, json\n"
        f"prompts = {json.dumps(prompts)}\n"
        f"replies = [httpx.post('{served.router.http}/v1/completions', json={{'prompt': p, 'max_tokens': {MAX_TOKENS}, 'temperature': 0, 'ignore_eos': True, 'logprobs': 0, 'return_tokens_as_token_ids': True}}, timeout=120).json() for p in prompts]\n"
        "print(json.dumps([r['choices'][0]['logprobs']['tokens'] for r in replies]))",
    )
    expected = reference_outputs(prompts, MAX_TOKENS, tmp_path)
    assert [[int(t.removeprefix("token_id:")) for t in a] for a in answers] == expected

    decode = next(
        w
        for w in on_host("head", f"import httpx, json; print(json.dumps(httpx.get('{served.router.http}/cluster').json()['workers']))")
        if w["role"] == "decode"
    )
    # Over NIXL, or the TCP channel where `auto` fell back for one (/cluster says which).
    by_transport = decode["kv_transfers_by_transport"]
    assert sum(by_transport.values()) == 2 and set(by_transport) <= {"nixl", "tcp"}, by_transport
    # The KV reached the decode host through its link (not shared memory), with the tokens and RPCs.
    assert link_bytes("decode-1") - received_before >= decode["kv_bytes_received"] > 0


def test_the_links_are_shaped_and_down_leaves_nothing(lab):
    qdisc = subprocess.run(
        host_command(LAB.name, "decode-1", ["tc", "qdisc", "show", "dev", "eth0"]), capture_output=True, text=True
    ).stdout
    assert "tbf" in qdisc and "rate 2Gbit" in qdisc, qdisc
    inits = load(LAB.name)[1]
    assert existing_namespaces(LAB.name) == sorted(f"{LAB.name}-{h}" for h in ("head", "prefill-1", "decode-1", "switch"))
    assert (ray_dir(LAB.name) / "session_latest").exists()  # the lab's Ray kept to the lab's own directory
    down(LAB.name)  # (last in the module; the fixture's own down then finds nothing)
    assert existing_namespaces(LAB.name) == [] and not any(alive(pid) for pid in inits.values())
    assert not lab_dir(LAB.name).exists()


def link_bytes(host: str) -> int:
    """Bytes the host's eth0 has received."""
    return int(on_host(host, "print(open('/sys/class/net/eth0/statistics/rx_bytes').read().strip())"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
