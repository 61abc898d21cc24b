"""Tenants as the router decides on them: keys to tenants, the spec's and a file's tenants
checked, the concurrency and tokens-per-minute limits with when to retry, held across two
routers through a real Redis, the models a tenant may use, and usage with each tenant's share
of the cost; the front door's middleware that refuses and marks answers."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from pdcluster.router.caller import CallerMiddleware, current_caller
from pdcluster.router.config import RouterConfig, TenantConfig
from pdcluster.router.tenant_load_sync import TenantLoadSync
from pdcluster.router.tenant_usage import TenantUsage, UsageFigures
from pdcluster.router.tenants import DEFAULT_TENANT, Tenants, TokenWindow, configured_tenants, seconds_until_under

ACME = TenantConfig(name="acme", api_keys=["k-acme", "k-acme-2"], max_concurrent=2, tokens_per_minute=1000, models=["small"])
BETA = TenantConfig(name="beta", api_keys=["k-beta"], priority=1)


def test_keys_name_their_tenant_and_the_routers_own_key_names_none():
    tenants = Tenants([ACME, BETA], admin_key="admin")
    assert tenants.identify("Bearer k-acme-2") == ACME and tenants.identify("Bearer k-beta") == BETA
    assert tenants.identify("Bearer admin") == DEFAULT_TENANT
    assert tenants.identify("Bearer nobody") is None and tenants.identify("") is None
    assert sorted(tenants.api_keys) == ["admin", "k-acme", "k-acme-2", "k-beta"]
    assert Tenants([]).identify("") == DEFAULT_TENANT  # no keys at all: everyone is the default tenant


def test_tenants_come_from_the_spec_and_a_file_and_are_checked(tmp_path):
    listed = tmp_path / "tenants.yaml"
    listed.write_text(yaml.safe_dump([{"name": "beta", "api_keys": ["k-beta"], "priority": 1}]))
    config = RouterConfig(tenants=[ACME], tenants_file=str(listed))
    assert configured_tenants(config) == [ACME, BETA]
    with pytest.raises(ValueError, match="names must be unique: acme"):
        configured_tenants(RouterConfig(tenants=[ACME, ACME]))
    with pytest.raises(ValueError, match="one tenant only"):
        configured_tenants(RouterConfig(tenants=[ACME], api_key="k-acme"))
    listed.write_text(yaml.safe_dump([{"name": "x", "api_keys": []}]))
    with pytest.raises(ValidationError, match="api_keys"):
        configured_tenants(RouterConfig(tenants_file=str(listed)))


def test_a_tenant_past_its_concurrency_or_tokens_is_refused_with_when_to_retry():
    tenants = Tenants([ACME])
    assert tenants.admission_refusal(ACME, 2, now=0.0) is None
    tenants.open["acme"] = 1
    refusal = tenants.admission_refusal(ACME, 2, now=0.0)
    assert refusal is not None and refusal.status == 429 and refusal.reason == "concurrency" and refusal.retry_after_s == 1
    tenants.open["acme"] = 0
    window = tenants._tokens["acme"]
    window.add(600, now=10.2)
    window.add(500, now=30.7)
    refusal = tenants.admission_refusal(ACME, 1, now=40.0)
    # 1100 tokens in the last minute: under 1000 once the first 600 age out, at 70 s.
    assert refusal is not None and refusal.reason == "tokens" and refusal.retry_after_s == 30
    assert tenants.admission_refusal(ACME, 1, now=70.5) is None
    assert tenants.admission_refusal(BETA, 100, now=0.0) is None  # no limits
    # What other routers hold counts as this one's.
    tenants.elsewhere.open["acme"] = 2
    refusal = tenants.admission_refusal(ACME, 1, now=70.5)
    assert refusal is not None and refusal.reason == "concurrency" and "has 2 requests" in refusal.message
    tenants.elsewhere.open["acme"] = 0
    tenants.elsewhere.tokens["acme"] = [(10, 900), (65, 400)]  # second 10 is out of the window at 70.5: 500 + 400 here
    assert tenants.admission_refusal(ACME, 1, now=70.5) is None
    tenants.elsewhere.tokens["acme"].append((69, 200))
    refusal = tenants.admission_refusal(ACME, 1, now=70.5)
    assert refusal is not None and refusal.reason == "tokens" and refusal.retry_after_s == 20  # this router's 500 leave at 90


def test_the_token_window_forgets_what_is_older_than_a_minute():
    window = TokenWindow()
    window.add(5, now=0.5)
    window.add(7, now=0.9)
    window.add(11, now=59.9)
    assert seconds_until_under(window.buckets(30.0), 20, now=30.0) == 30  # second 0's 12 tokens age out at 60 s
    assert window.buckets(59.9) == [(0, 12), (59, 11)] and window.buckets(60.0) == [(59, 11)]


async def test_two_routers_hold_a_tenants_limits_together_through_redis(redis_url):
    """Each router's requests and tokens count at the other as they start and end; a router
    that stops counts no more."""
    routers = [Tenants([ACME, BETA]) for _ in range(2)]
    syncs = [TenantLoadSync(redis_url, "limits-test", tenants) for tenants in routers]

    async def until(holds, what: str) -> None:
        deadline = time.monotonic() + 10
        while not holds():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    for sync in syncs:
        sync.start()
    try:
        routers[0].charge(ACME, 1200)
        routers[0].opened(ACME, 2)
        routers[0].opened(BETA, 5)  # no limits: not shared
        await until(lambda: routers[1].elsewhere.open == {"acme": 2}, "router 1 to hear of acme's requests")
        assert sum(t for _, t in routers[1].elsewhere.tokens["acme"]) == 1200
        refusal = routers[1].admission_refusal(ACME, 1, time.time())
        assert refusal is not None and refusal.reason == "concurrency"
        routers[0].closed(ACME, 2)
        await until(lambda: routers[1].elsewhere.open == {"acme": 0}, "router 1 to hear they ended")
        refusal = routers[1].admission_refusal(ACME, 1, time.time())
        assert refusal is not None and refusal.reason == "tokens" and 1 <= refusal.retry_after_s <= 60
        await until(lambda: routers[0].elsewhere.open == {"acme": 0}, "router 0 to hear router 1's heartbeat: nothing held")
        await syncs[0].close()  # gone at once, not after TTL_S
        await until(lambda: routers[1].elsewhere.open == {}, "router 1 to hear router 0 stopped")
        assert routers[1].admission_refusal(ACME, 1, time.time()) is None
    finally:
        for sync in syncs:
            await sync.close()


def test_a_tenant_may_use_only_its_models():
    served = [["tiny", "tiny-alias"], ["other"]]
    assert Tenants.model_refusal(ACME, "small", served) is None
    refusal = Tenants.model_refusal(ACME, "tiny-alias", served)
    assert refusal is not None and refusal.status == 403 and "may not use the model tiny" in refusal.message
    assert Tenants.model_refusal(ACME, None, served) is not None  # no model named: the first model
    assert Tenants.model_refusal(ACME, "other", served) is not None  # another model's names are not its
    assert Tenants.model_refusal(ACME.model_copy(update={"models": ["other"]}), "other", served) is None
    assert Tenants.model_refusal(BETA, "anything", served) is None  # no list: every model


async def test_the_front_door_refuses_bad_words_and_marks_cached_streams():
    """The cache's answer is known only once the first chunk is made, after a stream's headers
    would have left: they wait for it. A cache word neither on nor off is a 400; a model the
    tenant may not use a 403, counted."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def stream() -> StreamingResponse:
        async def chunks():
            current_caller().cache = "hit"  # as the engine client marks it, on its first output
            yield b"data: {}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    refused: list[tuple[str, str]] = []
    tenants = Tenants([ACME, BETA.model_copy(update={"response_cache": True})])
    door = CallerMiddleware(app, tenants, [["tiny"]], lambda tenant, reason: refused.append((tenant, reason)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(door), base_url="http://router") as client:
        beta = {"authorization": "Bearer k-beta"}
        reply = await client.post("/v1/completions", json={"stream": True}, headers=beta)
        assert reply.headers["x-response-cache"] == "hit" and reply.text == "data: {}\n\n"
        off = await client.post("/v1/completions", json={}, headers={**beta, "x-response-cache": "off"})
        assert off.status_code == 200 and "x-response-cache" not in off.headers
        bad = await client.post("/v1/completions", json={}, headers={**beta, "x-response-cache": "maybe"})
        assert bad.status_code == 400 and "x-response-cache is on or off" in bad.json()["error"]["message"]
        forbidden = await client.post("/v1/completions", json={"model": "tiny"}, headers={"authorization": "Bearer k-acme"})
        assert forbidden.status_code == 403 and refused == [("acme", "model")]


def test_usage_shares_the_cost_by_tokens_served():
    usage = TenantUsage(CollectorRegistry(), cost_per_hour=lambda: 36.0)
    usage._accrued_at -= 100  # 100 s of a $36/h cluster: $1
    usage.record("acme", "tiny", UsageFigures(requests=3, prompt_tokens=600, cached_tokens=100, completion_tokens=150))
    usage.record("acme", "lora-a", UsageFigures(requests=1, prompt_tokens=50, completion_tokens=200))
    usage.record("beta", "tiny", UsageFigures(requests=4, prompt_tokens=300, completion_tokens=200, cache_hits=1))
    report = usage.report()
    acme, beta = report["tenants"]["acme"], report["tenants"]["beta"]
    assert (acme["requests"], acme["prompt_tokens"], acme["cached_tokens"], acme["completion_tokens"]) == (4, 650, 100, 350)
    assert acme["models"]["lora-a"]["completion_tokens"] == 200 and beta["cache_hits"] == 1
    assert report["cost_usd"] == pytest.approx(1.0, rel=1e-3)
    assert acme["cost_usd"] == pytest.approx(1.0 * 1000 / 1500, rel=1e-3)
    assert beta["usd_per_1k_requests"] == pytest.approx(1.0 * 500 / 1500 / 4 * 1000, rel=1e-3)
    assert beta["usd_per_million_tokens"] == pytest.approx(1.0 / 1500 * 1e6, rel=1e-3)
    assert list(usage.report(["beta"])["tenants"]) == ["beta"]


def test_bench_serve_tenants_parse_and_mix_by_weight():
    from pdcluster.bench.serve_bench import BenchTenant, assign_tenants

    big, small = BenchTenant.parse("big:k-big:4"), BenchTenant.parse("small:k:1:lora-a")
    assert (big.name, big.api_key, big.weight, big.model) == ("big", "k-big", 4.0, "")
    assert small.model == "lora-a"
    for bad in ("big", "big:k", ":k:1", "big:k:0", "big:k:x"):
        with pytest.raises(ValueError):
            BenchTenant.parse(bad)
    mix = assign_tenants([big, small], 1000, seed=3)
    assert mix == assign_tenants([big, small], 1000, seed=3)  # seeded: every server gets the same mix
    assert 0.75 < mix.count(big) / 1000 < 0.85
