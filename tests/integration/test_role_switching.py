"""Workers that change role: a prefill worker drains and becomes a decode worker, and back;
the router follows each move at its next poll, and every answer stays the same."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import openai
import pytest

from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc

from tests.support.processes import running_cluster
from tests.support.router_metrics import metric
from tests.support.worker_calls import worker_channel

pytestmark = pytest.mark.slow

PROMPT = "The river ran past the old mill and the miller watched the water turn the wheel all day long"


async def switch(address: str, role: str) -> wpb.SwitchRoleReply:
    async with worker_channel(address) as channel:
        return await wgrpc.WorkerStub(channel).SwitchRole(wpb.SwitchRoleRequest(role=role), timeout=60)


def roles_seen(http: httpx.Client) -> list:
    return sorted((w["address"], w["role"]) for w in http.get("/cluster").json()["workers"] if w["healthy"])


def wait_for_roles(http: httpx.Client, expected: list) -> None:
    deadline = time.monotonic() + 30
    while roles_seen(http) != sorted(expected):
        assert time.monotonic() < deadline, roles_seen(http)
        time.sleep(0.2)


def test_a_worker_switches_pools_and_back_with_the_same_answers():
    with running_cluster(role_switching=True, router_args=["--bypass-prefill-below", "8"]) as (router, (prefill, decode)):
        client = openai.OpenAI(base_url=router.record.http + "/v1", api_key="unused", max_retries=0, timeout=120)
        kwargs = dict(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        with httpx.Client(base_url=router.record.http, timeout=30) as http:
            expected = client.completions.create(**kwargs).choices[0].text
            assert metric(http, "pdcluster_router_worker_picks_total", 'role="prefill"') == 1  # computed remotely

            reply = asyncio.run(switch(prefill.address, "decode"))
            assert reply.role == "decode" and reply.drained_seconds < 5  # nothing was running: no wait for a drain
            wait_for_roles(http, [(prefill.address, "decode"), (decode.address, "decode")])
            assert client.completions.create(**kwargs).choices[0].text == expected  # no prefill pool: on a decode worker
            assert metric(http, "pdcluster_router_prefill_bypass_total", 'reason="no_prefill_worker"') == 1

            assert asyncio.run(switch(prefill.address, "prefill")).role == "prefill"
            wait_for_roles(http, [(prefill.address, "prefill"), (decode.address, "decode")])
            assert client.completions.create(**kwargs).choices[0].text == expected
            assert metric(http, "pdcluster_router_worker_picks_total", 'role="prefill"') == 2

            with pytest.raises(grpc.aio.AioRpcError) as bad:
                asyncio.run(switch(decode.address, "router"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefill, decode" in bad.value.details()
