"""Prefix routing from vLLM's KV cache events, on real engines: a prefill worker mirrors its
engine's BlockStored events under the names routers give prompt blocks, and a router that
never routed a prompt still sends its prefix to the worker that holds it; a conversation's next
turn is computed on the decode worker that holds its earlier turns. The workers: the shared
pair and a second prefill worker of this test's own."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from pdcluster.common.prefix_hashes import prompt_block_hashes
from pdcluster.common.processes import start_process, stop_all, wait_ready
from pdcluster.common.tiny_model.generate import CORPUS
from pdcluster.common.worker_record import Role

from tests.support.processes import EAGER, SMALL_KV, start_router, start_routers
from tests.support.router_metrics import metric
from tests.support.worker_calls import kv_stats, prefix_cache_snapshot

pytestmark = pytest.mark.slow

ROUTER_ARGS = ["--enable-prompt-tokens-details"]
BLOCK = 128  # vLLM's CPU block size


def complete(url: str, prompt: list[int], max_tokens: int = 2) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def wait_for(predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return value


def test_workers_publish_their_prefix_cache_and_a_new_router_routes_by_it(tokenizer, shared_pair, shared_worker_args):
    tokens = tokenizer(CORPUS.read_text()).input_ids  # 665 tokens
    prompt = random.Random(7).sample(tokens, 600)  # in an order no other test sends to the shared pair
    # Two prefill workers: the shared pair's and one of this test's own.
    extra = start_process(Role.PREFILL, [*shared_worker_args, *EAGER, *SMALL_KV])
    started = [extra]
    try:
        wait_ready(extra)
        prefills, decode = [shared_pair[0], extra], shared_pair[1]
        workers = [*prefills, decode]
        before = [asyncio.run(prefix_cache_snapshot(w.address)) for w in prefills]
        names = prompt_block_hashes(prompt, BLOCK)
        assert all(s.reset and not set(names) & set(s.stored) for s in before)  # nobody holds the prompt yet
        router = start_router([w.address for w in workers], ROUTER_ARGS)
        started.append(router)
        complete(router.record.http, prompt)

        # The worker that computed the prompt now holds its full blocks, named as routers name them.
        def holder():
            now = [asyncio.run(prefix_cache_snapshot(w.address)) for w in prefills]
            return next(((w, s) for w, s in zip(prefills, now, strict=True) if set(names) <= set(s.stored)), None)

        worker, held = wait_for(holder)
        assert held.block_size == BLOCK and len(names) == 600 // BLOCK

        # A second router never sent this prompt anywhere; the events tell it where the prefix is.
        second, guessing = start_routers([w.address for w in workers], [ROUTER_ARGS, [*ROUTER_ARGS, "--prefill-routing", "guess"]])
        started += [second, guessing]
        http = second.record.http

        def index_of(url):
            return httpx.get(url + "/cluster", timeout=30).json()["prefix_index_blocks"]

        assert wait_for(lambda: index_of(http).get(worker.record.worker_id, 0) >= len(names))
        assert not index_of(guessing.record.http)  # guesses come only from its own routing
        sibling = prompt[: len(names) * BLOCK] + tokens[600:]
        usage = complete(http, sibling)["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= len(names) * BLOCK
    finally:
        stop_all(started)


def test_a_conversations_next_turn_is_computed_where_its_earlier_turns_are(tokenizer, shared_pair, vllm_reference):
    prefill, decode = shared_pair
    tokens = tokenizer(CORPUS.read_text()).input_ids
    first = random.Random(11).sample(tokens, 5 * BLOCK)  # five full blocks, in an order no other test sends
    router = start_router([prefill.address, decode.address], ROUTER_ARGS)
    http = httpx.Client(base_url=router.record.http, timeout=300)
    try:
        answer = complete(router.record.http, first, max_tokens=8)["choices"][0]["token_ids"]
        # The first turn was prefilled remotely; its KV, received by the decode worker, is in that
        # engine's prefix cache, and its events say so to the router.
        names = prompt_block_hashes(first, BLOCK)

        def router_knows_what_decode_holds() -> bool:
            held = asyncio.run(prefix_cache_snapshot(decode.address)).stored
            known = http.get("/cluster").json()["prefix_index_blocks"].get(decode.record.worker_id, 0)
            return set(names) <= set(held) and known == len(held)  # the router has caught up with the worker's events

        assert wait_for(router_knows_what_decode_holds)
        # The next turn: all of it but 40 new tokens on the decode worker, under --bypass-prefill-below (64).
        turn = first + tokens[:40]
        moved, bypassed = (
            kv_stats(decode).bytes_received,
            metric(http, "pdcluster_router_prefill_bypass_total", 'reason="decode_holds_prefix"'),
        )
        reply = complete(router.record.http, turn, max_tokens=8)
        assert [answer, reply["choices"][0]["token_ids"]] == vllm_reference.greedy([first, turn], 8)
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 5 * BLOCK  # only the 40 new tokens computed
        assert metric(http, "pdcluster_router_prefill_bypass_total", 'reason="decode_holds_prefix"') == bypassed + 1
        assert kv_stats(decode).bytes_received == moved  # no KV moved for it
    finally:
        http.close()
        stop_all([router])
