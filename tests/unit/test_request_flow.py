"""The router's request flow against in-process fake workers (no engine): routing, failover,
resume, logprobs across attempts, cancellation, and that every count it takes on a worker is
given back however a request ends."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc
import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from pdcluster.common.worker_record import Role
from pdcluster.router.config import RouterConfig
from pdcluster.router.errors import NoCapacity
from pdcluster.router.generation import GenerationRequest, Usage
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.request_flow import RequestFlow
from pdcluster.router.worker_pool import WorkerPool

from tests.support.fake_worker import Behaviour, FakeWorker, expected_tokens, token_logprob

PROMPT = list(range(300, 340))  # long enough for a prefill worker (bypass below 8 tokens here)
SHORT_PROMPT = [300, 301, 302]


@contextlib.asynccontextmanager
async def fake_cluster(tokenizer, prefill=(Behaviour(),), decode=(Behaviour(),), **config):
    workers = [await FakeWorker(Role.PREFILL, tokenizer, b).start() for b in prefill]
    workers += [await FakeWorker(Role.DECODE, tokenizer, b).start() for b in decode]
    pool = WorkerPool([w.address for w in workers], interval_s=0.1, health_timeout_s=0.5, unhealthy_after=2)
    await pool.start()
    router_config = RouterConfig(bypass_prefill_below_tokens=8, capacity_wait_s=2, **config)
    flow = RequestFlow(pool, router_config, RouterMetrics(pool), tokenizer)
    try:
        yield flow, workers
    finally:
        await pool.close()
        for w in workers:
            await w.stop()


async def run(flow: RequestFlow, prompt=PROMPT, priority: int = 0, lora=None, session_id=None, **params):
    params.setdefault("max_tokens", 12)
    params.setdefault("temperature", 0.0)
    usage = Usage()
    request = GenerationRequest(
        uuid.uuid4().hex, list(prompt), SamplingParams(**params), priority=priority, lora=lora, session_id=session_id
    )
    deltas = [d async for d in flow.generate(request, usage)]
    return deltas, usage


def tokens_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def assert_at_rest(flow: RequestFlow) -> None:
    for view in flow.pool.workers():
        assert view.load.at_rest, (view.address, view.load)


def metric(flow: RequestFlow, name: str, **labels) -> float:
    return flow.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_disaggregated_request_streams_the_models_tokens_and_gives_every_count_back(tokenizer):
    async with fake_cluster(tokenizer) as (flow, workers):
        deltas, usage = await run(flow)
        prefill, decode = workers
        assert tokens_of(deltas) == expected_tokens(PROMPT, 12)
        assert "".join(d.text for d in deltas) == tokenizer.decode(expected_tokens(PROMPT, 12))
        assert deltas[-1].finish_reason == "length"
        assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (len(PROMPT), 12, 16)
        # One transfer: the decode call waited for the KV the prefill call sent under the same id.
        (prefill_call,) = prefill.calls_of("Prefill")
        (decode_call,) = decode.calls_of("Decode")
        assert decode_call.request.transfer_id == prefill_call.request.target.transfer_id
        assert prefill_call.request.target.consumer_endpoint == f"kv-{decode.address}"
        assert decode_call.request.producer_kv_endpoint == f"kv-{prefill.address}"
        assert_at_rest(flow)


async def test_the_requests_priority_reaches_both_workers(tokenizer):
    async with fake_cluster(tokenizer) as (flow, (prefill, decode)):
        await run(flow, priority=-3)
        assert prefill.calls_of("Prefill")[0].request.priority == decode.calls_of("Decode")[0].request.priority == -3


async def test_a_lora_request_names_its_adapter_to_both_workers(tokenizer):
    """Name and path: any worker, one started after the adapter was loaded too, loads it."""
    from vllm.lora.request import LoRARequest

    async with fake_cluster(tokenizer) as (flow, (prefill, decode)):
        await run(flow, lora=LoRARequest("tiny-lora", 7, "/adapters/tiny"))
        for call in (prefill.calls_of("Prefill")[0], decode.calls_of("Decode")[0]):
            assert (call.request.lora.name, call.request.lora.path) == ("tiny-lora", "/adapters/tiny")
        await run(flow)
        assert not decode.calls_of("Decode")[1].request.HasField("lora")


async def test_a_sessions_turns_stay_on_one_decode_worker_until_it_is_saturated(tokenizer):
    async with fake_cluster(tokenizer, decode=(Behaviour(), Behaviour())) as (flow, (_, d1, d2)):

        def decoded_on() -> list[str]:
            return [w.address for w in (d1, d2) for _ in w.calls_of("Decode")]

        await run(flow, session_id="chat-1")
        (first,) = decoded_on()
        for _ in range(3):  # without a session these would alternate between the two
            await run(flow, session_id="chat-1")
        assert decoded_on() == [first] * 4
        await run(flow)
        await run(flow)
        assert sorted(decoded_on()) == sorted([first] * 5 + [d2.address if first == d1.address else d1.address])
        # Its worker now has requests waiting: the next turn moves, and stays where it moved.
        busy = d1 if first == d1.address else d2
        busy.behaviour.queued = 3
        await asyncio.sleep(0.4)  # the pool's next Stats poll
        await run(flow, session_id="chat-1")
        await run(flow, session_id="chat-1")
        other = (d2 if busy is d1 else d1).calls_of("Decode")
        assert len(other) == 3  # one request without a session, and the two moved turns
        assert [metric(flow, "pdcluster_router_session_turns_total", outcome=o) for o in ("new", "kept", "moved")] == [1, 4, 1]
        assert_at_rest(flow)


async def test_short_prompt_bypasses_prefill(tokenizer):
    async with fake_cluster(tokenizer) as (flow, (prefill, decode)):
        deltas, _ = await run(flow, SHORT_PROMPT)
        assert tokens_of(deltas) == expected_tokens(SHORT_PROMPT, 12)
        assert prefill.calls == []
        assert not decode.calls_of("Decode")[0].request.HasField("transfer_id")
        assert metric(flow, "pdcluster_router_prefill_bypass_total", reason="short_prompt") == 1
        assert_at_rest(flow)


async def test_decode_lost_mid_stream_resumes_elsewhere_with_the_same_tokens_text_and_logprobs(tokenizer):
    fails_once = Behaviour(fail_after=5, failures_left=1)  # shared: whichever worker is picked first fails
    async with fake_cluster(tokenizer, decode=(fails_once, fails_once)) as (flow, (_, first, second)):
        deltas, usage = await run(flow, max_tokens=12, logprobs=0)
        expected = expected_tokens(PROMPT, 12)
        assert tokens_of(deltas) == expected
        # The resumed part's text is decoded by the router from every token sent.
        assert "".join(d.text for d in deltas) == tokenizer.decode(expected)
        assert usage.completion_tokens == 12
        # Logprobs stitch across attempts: each token's own, and one running sum over all of them.
        assert [next(iter(p.values())).logprob for d in deltas for p in d.logprobs] == pytest.approx([token_logprob(t) for t in expected])
        assert deltas[-1].cumulative_logprob == pytest.approx(sum(token_logprob(t) for t in expected))
        # The first attempt ended on the worker that failed, the second continued from its
        # 5 tokens on the other, with a fresh prefill of prompt + those tokens.
        failed, resumed = sorted(first.calls_of("Decode") + second.calls_of("Decode"), key=lambda c: len(c.request.prompt_token_ids))
        assert failed.outcome == "failed" and resumed.outcome == "finished"
        assert list(resumed.request.prompt_token_ids) == PROMPT + expected[:5]
        assert metric(flow, "pdcluster_router_resumes_total") == 1
        assert_at_rest(flow)


async def test_failed_prefill_cancels_the_waiting_decode_and_the_prompt_is_computed_elsewhere(tokenizer):
    async with fake_cluster(tokenizer, prefill=(Behaviour(fail_after=0),)) as (flow, (prefill, decode)):
        deltas, _ = await run(flow)
        assert tokens_of(deltas) == expected_tokens(PROMPT, 12)
        waiting, computed = decode.calls_of("Decode")
        # The decode call that waited for the failed prefill's KV was cancelled, not left waiting.
        await until(lambda: waiting.outcome == "cancelled")
        assert waiting.request.HasField("transfer_id")
        # The retry excluded the prefill worker; with none left, the decode worker computed the prompt.
        assert not computed.request.HasField("transfer_id") and computed.outcome == "finished"
        assert metric(flow, "pdcluster_router_retries_total", role="prefill") == 1
        assert metric(flow, "pdcluster_router_prefill_bypass_total", reason="no_prefill_worker") == 1
        assert_at_rest(flow)


async def test_frozen_decode_worker_is_found_lost_and_its_stream_resumed(tokenizer):
    async with fake_cluster(tokenizer, decode=(Behaviour(), Behaviour())) as (flow, (_, first, second)):
        first.behaviour = second.behaviour = Behaviour(hang_after=4)
        deltas_task = asyncio.ensure_future(run(flow))
        await until(lambda: first.frozen.is_set() or second.frozen.is_set())
        frozen, other = (first, second) if first.frozen.is_set() else (second, first)
        other.behaviour = Behaviour()
        deltas, _ = await asyncio.wait_for(deltas_task, 30)
        assert tokens_of(deltas) == expected_tokens(PROMPT, 12)
        # The router cancelled the call on the frozen worker (it drops the request if it wakes).
        await until(lambda: frozen.calls_of("Decode")[0].outcome == "cancelled")
        assert metric(flow, "pdcluster_router_resumes_total") == 1
        assert_at_rest(flow)


async def test_the_only_decode_worker_cut_off_and_back_resumes_its_stream_there(tokenizer):
    # A partition: the worker stops answering, is found lost, and answers again when it ends.
    async with fake_cluster(tokenizer, decode=(Behaviour(hang_after=4),)) as (flow, (_, decode)):
        deltas_task = asyncio.ensure_future(run(flow))
        await until(lambda: decode.calls_of("Decode") and decode.calls_of("Decode")[0].outcome == "cancelled")
        decode.behaviour = Behaviour()
        decode.frozen.clear()
        deltas, _ = await asyncio.wait_for(deltas_task, 30)
        assert tokens_of(deltas) == expected_tokens(PROMPT, 12)
        assert len(decode.calls_of("Decode")) == 2 and metric(flow, "pdcluster_router_resumes_total") == 1
        assert_at_rest(flow)


async def test_request_the_worker_refuses_as_invalid_is_the_clients_error_and_not_retried(tokenizer):
    async with fake_cluster(tokenizer, decode=(Behaviour(fail_after=0, fail_code=grpc.StatusCode.INVALID_ARGUMENT),)) as (flow, workers):
        with pytest.raises(VLLMValidationError, match="fails after 0 tokens"):
            await run(flow)
        assert sum(len(w.calls_of("Decode")) for w in workers) == 1
        assert metric(flow, "pdcluster_router_requests_total", outcome="invalid") == 1
        assert_at_rest(flow)


async def test_a_client_that_goes_away_cancels_the_request_on_its_workers(tokenizer):
    async with fake_cluster(tokenizer, decode=(Behaviour(token_delay_s=0.05),)) as (flow, (_, decode)):
        usage = Usage()
        stream = flow.generate(GenerationRequest("gone", PROMPT, SamplingParams(max_tokens=200, temperature=0.0)), usage)
        async for _ in stream:
            break
        await stream.aclose()
        (call,) = decode.calls_of("Decode")
        await until(lambda: call.outcome == "cancelled")
        assert metric(flow, "pdcluster_router_requests_total", outcome="cancelled") == 1
        assert_at_rest(flow)


async def test_no_decode_worker_left_is_a_503_after_the_attempts(tokenizer):
    failing = Behaviour(fail_after=2)
    async with fake_cluster(tokenizer, decode=(failing, failing)) as (flow, _):
        # Both answer their health checks, so each is tried again once the other failed too.
        with pytest.raises(NoCapacity, match="request failed on 4 workers"):
            await run(flow)
        assert metric(flow, "pdcluster_router_requests_total", outcome="unavailable") == 1
        assert_at_rest(flow)


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
