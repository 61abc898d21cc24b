"""Request priority, as vLLM has it (`--scheduling-policy priority`; lower runs first): a
high-priority request overtakes low-priority ones queued before it, both where the workers'
engines queue them (one sequence at a time on the decode worker) and where the router queues
them (`--max-inflight 1`). Without priority it would finish last."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.processes import running_pair, start_router
from tests.support.worker_calls import worker_stats

pytestmark = pytest.mark.slow

PRIORITY = ["--scheduling-policy", "priority"]
BYPASS = ["--bypass-prefill-below", "1000000"]  # every prompt on the decode worker: its engine's queue is the one tested
PROMPT = "The old mill stands by the river"


@pytest.fixture(scope="module")
def workers():
    with running_pair([*PRIORITY, "--max-num-seqs", "1"], [*PRIORITY, "--max-num-seqs", "1"]) as pair:
        yield pair


async def finish_order(url: str, decode) -> list[str]:
    """A long request runs; three low-priority ones arrive, then a high-priority one: the order
    the four queued ones finish in."""
    order: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:

        async def send(name: str, priority: int, max_tokens: int) -> None:
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "priority": priority}
            response = await http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            order.append(name)

        running = asyncio.create_task(send("running", 0, 2000))
        deadline = time.monotonic() + 60
        while not (await asyncio.to_thread(worker_stats, decode.address)).running:
            assert time.monotonic() < deadline, "the long request never started"
            await asyncio.sleep(0.05)
        queued = []
        for i in range(3):
            queued.append(asyncio.create_task(send(f"low-{i}", 5, 32)))
            await asyncio.sleep(0.1)  # arrival order is the tie-break among equals
        queued.append(asyncio.create_task(send("high", -5, 32)))
        await asyncio.gather(running, *queued)
    return [name for name in order if name != "running"]


def test_a_high_priority_request_overtakes_queued_ones_on_the_workers(workers):
    _, decode = workers
    router = start_router([w.address for w in workers], [*PRIORITY, *BYPASS])
    try:
        assert asyncio.run(finish_order(router.record.http, decode)) == ["high", "low-0", "low-1", "low-2"]
    finally:
        router.stop()


def test_a_high_priority_request_overtakes_queued_ones_in_the_routers_queue(workers):
    _, decode = workers
    router = start_router([w.address for w in workers], [*PRIORITY, *BYPASS, "--max-inflight", "1"])
    try:
        assert asyncio.run(finish_order(router.record.http, decode)) == ["high", "low-0", "low-1", "low-2"]
        queued = httpx.get(router.record.http + "/metrics", timeout=30).text
        assert "pdcluster_router_queue_depth 0.0" in queued  # every waiter left the queue
    finally:
        router.stop()
