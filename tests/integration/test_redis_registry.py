"""Several routers sharing one real Redis registry: workers announce themselves with a TTL,
both routers see the same membership, tenants (and hold their limits together) and prefix-cache
hints, a Redis restart (empty) costs no worker, and a killed worker drops out of both on its own."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import httpx
import pytest

from pdcluster.common.processes import start_process, wait_ready
from pdcluster.common.redis_server import start_redis
from pdcluster.common.registry import RedisRegistry
from pdcluster.common.tiny_model.generate import CORPUS
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc

from tests.support.processes import EAGER, SMALL_KV, start_router

pytestmark = pytest.mark.slow


@pytest.fixture
def redis():
    """[server, url]: the test restarts the server in place."""
    held = list(start_redis())
    yield held
    held[0].terminate()
    held[0].wait(10)


async def publish_token(url: str, cluster: str, token: str) -> None:
    registry = RedisRegistry(url, cluster)
    await registry.publish_token(token)
    await registry.close()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
    return result


def test_two_routers_share_membership_tenants_and_prefix_hints(redis, tokenizer, tmp_path):
    redis_url = redis[1]
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text('[{"name": "acme", "api_keys": ["k-acme"], "max_concurrent": 1, "tokens_per_minute": 1500}]')
    # The workers require the cluster token; the routers are not given it and read it from the
    # registry, where the controller publishes it.
    args = ["--registry", redis_url, "--cluster-name", "regtest", "--auth-token", "t0ken", *EAGER, *SMALL_KV]
    workers = [start_process("prefill", args), start_process("decode", args)]
    routers = []
    try:
        asyncio.run(publish_token(redis_url, "regtest", "t0ken"))
        for w in workers:
            wait_ready(w)
        # Router 0 is given the tenants and keeps them in the registry; router 1 serves them from there.
        registry = ["--registry", redis_url, "--cluster-name", "regtest"]
        # One after the other: router 1 reads the tenants router 0 wrote at its start.
        routers = [start_router([], [*registry, "--tenants-file", str(tenants_file)])]
        routers.append(start_router([], registry))
        urls = [r.record.http for r in routers]
        acme = {"authorization": "Bearer k-acme"}
        for url in urls:
            assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60).status_code == 401

        def members(url):
            return {w["address"]: w for w in httpx.get(url + "/cluster", timeout=10).json()["workers"]}

        expected = {w.address for w in workers}
        for url in urls:
            wait_for(lambda: set(members(url)) == expected and all(m["healthy"] for m in members(url).values()), 30, "membership")

        with grpc.insecure_channel(workers[0].address) as channel, pytest.raises(grpc.RpcError) as refused:
            wgrpc.WorkerStub(channel).Stats(wpb.StatsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A prefill routed by router 0 becomes a prefix hint in router 1.
        prompt = tokenizer.decode(tokenizer(CORPUS.read_text()).input_ids[:600])
        reply = httpx.post(
            urls[0] + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}, headers=acme, timeout=120
        )
        assert reply.status_code == 200, reply.text
        # acme may run one request at a time: router 1 hears that router 0's ended within a message's trip.
        wait_for(
            lambda: (
                httpx.post(urls[1] + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=acme, timeout=120).status_code
                == 200
            ),
            5,
            "router 1 to admit acme",
        )
        prefill_id = workers[0].record.worker_id  # the decode worker's own prefix cache is in the index too

        def prefill_blocks(url: str) -> int:
            return httpx.get(url + "/cluster").json()["prefix_index_blocks"].get(prefill_id, 0)

        hinted = wait_for(lambda: prefill_blocks(urls[1]), 15, "prefix hint")
        assert hinted == prefill_blocks(urls[0]) == len(tokenizer(prompt).input_ids) // 128  # full CPU blocks

        # acme's limits hold across both routers: its stream at router 0 is its one request at router 1 too.
        def refusal_at(url: str, why: str) -> httpx.Response | None:
            reply = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=acme, timeout=60)
            return reply if reply.status_code == 429 and why in reply.json()["error"]["message"] else None

        stream = {"prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", urls[0] + "/v1/completions", json=stream, headers=acme, timeout=60) as running:
            chunks = running.iter_lines()  # kept: a dropped iterator closes the response
            next(chunks)
            wait_for(lambda: refusal_at(urls[1], "requests running or queued"), 10, "router 1 to count router 0's stream")

        # Tokens: router 0 spends acme's minute (its own requests refused at last); router 1, which served it a few, refuses too.
        def spent_at_router_0() -> bool:
            if refusal_at(urls[0], "tokens per minute"):
                return True
            httpx.post(urls[0] + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, headers=acme, timeout=60)
            return False

        wait_for(spent_at_router_0, 30, "router 0 to spend acme's minute")
        refused = wait_for(lambda: refusal_at(urls[1], "tokens per minute"), 10, "router 1 to count router 0's tokens")
        assert 1 <= int(refused.headers["retry-after"]) <= 60

        # Redis restarts empty: until the workers re-announce, the routers keep them.
        redis[0].kill()
        redis[0].wait(10)
        redis[0], _ = start_redis(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        until = time.monotonic() + 8  # past the routers' hold (one record lifetime, 5 s)
        while time.monotonic() < until:
            for url in urls:
                assert set(members(url)) == expected, "a Redis restart took workers away"
            time.sleep(0.2)

        # A SIGKILLed worker cannot say goodbye: its record expires and both routers drop it.
        decode = workers[1]
        os.kill(decode.process.pid, signal.SIGKILL)
        for url in urls:
            wait_for(lambda: decode.address not in members(url), 30, "dead worker to drop out")
            assert httpx.get(url + "/health").status_code == 503
    finally:
        for p in [*routers, *workers]:
            p.stop()
