"""Request priority, as vLLM has it (`--scheduling-policy priority`; lower runs first): a
high-priority request, sent over gRPC, overtakes low-priority ones queued before it, in the
router's queue (`--max-inflight 1`) and in a busy worker's engine (`--max-num-seqs 1`, the
router admitting everything). Without priority it would finish last. (That the priority
reaches both workers' engines is checked on the router's calls too, in
tests/unit/test_request_flow.py.)"""

from __future__ import annotations

import asyncio
import functools
import time

import grpc
import httpx
import pytest

from pdcluster.common.tiny_model.generate import BENCH_MODEL, ensure_tiny_model
from pdcluster.protos import inference_pb2 as ipb
from pdcluster.protos import inference_pb2_grpc as igrpc

from tests.support.processes import running_pair, start_router
from tests.support.router_metrics import metric

pytestmark = pytest.mark.slow

PRIORITY = ["--scheduling-policy", "priority"]
BYPASS = ["--bypass-prefill-below", "1000000"]  # every prompt on the decode worker
PROMPT = "The old mill stands by the river"


# The larger generated model: its steps are slow enough that, while the long request runs,
# the router relays few tokens a second and the others reach the engine long before it ends.
@pytest.fixture(scope="module")
def model() -> list[str]:
    return ["--model", str(ensure_tiny_model(spec=BENCH_MODEL))]


@pytest.fixture(scope="module")
def workers(model):
    busy = [*model, *PRIORITY, "--max-num-seqs", "1"]  # one request runs, the others wait in the engine
    with running_pair(busy, busy) as pair:
        yield pair


async def finish_order(router, engine_queue=None) -> list[str]:
    """A long request runs; three low-priority ones arrive over the OpenAI API, then a
    high-priority one over gRPC `Complete`: the order the four queued ones finish in.
    `engine_queue()`, if given, is the decode engine's (running, waiting) requests."""
    order: list[str] = []
    async with (
        httpx.AsyncClient(base_url=router.record.http, timeout=300) as http,
        grpc.aio.insecure_channel(router.record.grpc) as channel,
    ):

        async def send(name: str, priority: int, max_tokens: int) -> None:
            if name == "high":
                request = ipb.GenerateRequest(prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, priority=priority)
                assert len((await igrpc.InferenceStub(channel).Complete(request)).token_ids) == max_tokens
            else:
                body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "priority": priority}
                response = await http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
            order.append(name)

        streaming = asyncio.Event()

        async def run_long() -> None:
            # Long enough (seconds) that every other request is queued before it ends.
            body = {"prompt": PROMPT, "max_tokens": 800, "temperature": 0, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        streaming.set()  # it holds the router's one slot now

        running = asyncio.create_task(run_long())
        await asyncio.wait_for(streaming.wait(), 120)
        queued = []
        for i in range(3):
            queued.append(asyncio.create_task(send(f"low-{i}", 5, 32)))
            await asyncio.sleep(0.1)  # arrival order is the tie-break among equals
        queued.append(asyncio.create_task(send("high", -5, 32)))
        if engine_queue:  # the four wait in the decode engine's queue, behind the long one
            deadline = time.monotonic() + 30
            while (seen := await engine_queue()) != (1, 4):
                assert time.monotonic() < deadline and not running.done(), f"decode engine running/waiting: {seen}"
                await asyncio.sleep(0.2)
        await asyncio.gather(running, *queued)
    return order


def test_a_high_priority_request_overtakes_queued_ones_in_the_routers_queue(workers, model):
    router = start_router([w.address for w in workers], [*model, *PRIORITY, *BYPASS, "--max-inflight", "1"])
    try:
        assert asyncio.run(finish_order(router)) == ["high", "low-0", "low-1", "low-2"]
        queued = httpx.get(router.record.http + "/metrics", timeout=30).text
        assert "pdcluster_router_queue_depth 0.0" in queued  # every waiter left the queue
    finally:
        router.stop()


def test_a_high_priority_request_overtakes_queued_ones_in_a_busy_engine(workers, model):
    """The router admits all four at once; the decode engine runs one request at a time, so
    the others wait in its queue, which orders by the priority the router forwarded. (Among
    equal priorities the engine's arrival order is not the client's, so only the high one's
    place is checked.)"""
    router = start_router([w.address for w in workers], [*model, *PRIORITY, *BYPASS])
    decode = next(w for w in workers if w.role == "decode")

    metrics = httpx.Client(base_url=f"http://{decode.address.rsplit(':', 1)[0]}:{decode.worker.metrics_port}")

    async def engine_queue() -> tuple[int, int]:
        read = functools.partial(metric, metrics)
        return (
            int(await asyncio.to_thread(read, "vllm:num_requests_running")),
            int(await asyncio.to_thread(read, "vllm:num_requests_waiting")),
        )

    try:
        order = asyncio.run(finish_order(router, engine_queue))
        assert order[0] == "high" and sorted(order[1:]) == ["low-0", "low-1", "low-2"], order
    finally:
        router.stop()
