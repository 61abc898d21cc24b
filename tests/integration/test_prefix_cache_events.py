"""Prefix routing from vLLM's KV cache events, on real engines: a prefill worker mirrors its
engine's BlockStored events under the names routers give prompt blocks, and a router that
never routed a prompt still sends its prefix to the worker that holds it."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from pdcluster.common.prefix_hashes import prompt_block_hashes
from pdcluster.common.tiny_model.generate import CORPUS

from tests.support.processes import running_cluster, start_routers
from tests.support.worker_calls import prefix_cache_snapshot

pytestmark = pytest.mark.slow

ROUTER_ARGS = ["--enable-prompt-tokens-details"]


def complete(url: str, prompt: list[int]) -> dict:
    reply = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0}, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()["usage"]


def wait_for(predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return value


def test_workers_publish_their_prefix_cache_and_a_new_router_routes_by_it(tokenizer):
    tokens = tokenizer(CORPUS.read_text()).input_ids  # 665 tokens
    prompt = tokens[:600]
    with running_cluster(prefill=2, decode=1, router_args=ROUTER_ARGS) as (router, workers):
        prefills = [w for w in workers if w.role == "prefill"]
        before = [asyncio.run(prefix_cache_snapshot(w.address)) for w in prefills]
        assert all(s.reset and not s.stored for s in before)  # fresh engines hold nothing
        complete(router.record.http, prompt)

        # The worker that computed the prompt now holds its full blocks, named as routers name them.
        def holder():
            now = [asyncio.run(prefix_cache_snapshot(w.address)) for w in prefills]
            return next(((w, s) for w, s in zip(prefills, now, strict=True) if s.stored), None)

        worker, held = wait_for(holder)
        names = prompt_block_hashes(prompt, held.block_size)
        assert len(names) == 600 // held.block_size and set(names) <= set(held.stored)

        # A second router never sent this prompt anywhere; the events tell it where the prefix is.
        second, guessing = start_routers([w.address for w in workers], [ROUTER_ARGS, [*ROUTER_ARGS, "--prefill-routing", "guess"]])
        try:
            http = second.record.http

            def index_of(url):
                return httpx.get(url + "/cluster", timeout=30).json()["prefix_index_blocks"]

            assert wait_for(lambda: index_of(http).get(worker.record.worker_id, 0) >= len(names))
            assert not index_of(guessing.record.http)  # guesses come only from its own routing
            sibling = prompt[: len(names) * held.block_size] + tokens[600:]
            usage = complete(http, sibling)
            assert usage["prompt_tokens_details"]["cached_tokens"] >= len(names) * held.block_size
        finally:
            second.stop()
            guessing.stop()
