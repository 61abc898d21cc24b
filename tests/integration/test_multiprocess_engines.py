"""vLLM's default multiprocess CPU executor (a separate model process per engine) with our
connector: the transfer and token-exactness hold there too."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.processes import running_pair
from tests.support.vllm_reference import ENGINE_FLAGS
from tests.support.worker_calls import MAX_TOKENS, generate, kv_stats

pytestmark = pytest.mark.slow

PROMPTS = [list(range(20, 20 + n)) for n in (5, 200)]


@pytest.fixture(scope="module")
def mp_pair(model_dir):
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with running_pair(ENGINE_FLAGS, ENGINE_FLAGS, env=env) as pair:
        yield pair


def test_multiprocess_executor_transfer_is_token_exact(mp_pair, vllm_reference):
    expected = vllm_reference.greedy(PROMPTS, MAX_TOKENS)
    prefill, decode = mp_pair
    for prompt, want in zip(PROMPTS, expected):
        tokens, _, _ = asyncio.run(generate(prefill, decode, prompt))
        assert tokens == want
    stats = kv_stats(decode)
    assert stats.transfers_received == len(PROMPTS) and stats.recomputes == 0
