"""The host KV tier (vLLM's `--kv-offloading-size`) on real engines, disaggregated: prompt
blocks the engine evicted come back from the tier token-exact, and a tier block corrupted on
disk is caught by its checksum and recomputed, never decoded.

These two engines run vLLM's default multiprocess CPU executor (a model process apart from the
engine core; the rest of the suite runs the model in the engine core's process, as pdcluster
does on CPU): our connector's worker side, the tier included, lives in that model process."""

from __future__ import annotations

import asyncio
import os

import pytest

from pdcluster.common.prefix_hashes import prompt_block_hashes
from pdcluster.common.tiny_model.generate import CORPUS

from tests.support.processes import running_pair
from tests.support.worker_calls import MAX_TOKENS, generate, kv_stats, prefix_cache_snapshot

pytestmark = pytest.mark.slow

BLOCK = 128  # vLLM's CPU block size
ENGINE_BLOCKS = 10  # the engine's whole KV cache: fewer blocks than a round of prompts needs
NUM_PROMPTS = 6
PROMPT_TOKENS = 3 * BLOCK + 10  # 3 full blocks the tier can serve, and a partial one
MULTIPROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
ENGINE = ["--kv-offloading-size", "0.05", "--num-gpu-blocks-override", str(ENGINE_BLOCKS), "--max-model-len", "1024"]


@pytest.fixture(scope="module")
def tier_dir(tmp_path_factory):
    """The prefill worker's tier lives on disk here (the decode worker's in /dev/shm)."""
    return tmp_path_factory.mktemp("kv-tier")


@pytest.fixture(scope="module")
def tier_pair(tier_dir):
    with running_pair([*ENGINE, "--kv-tier-dir", str(tier_dir)], ENGINE, env=MULTIPROCESS) as pair:
        yield pair


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    ids = tokenizer(CORPUS.read_text() * 3).input_ids
    return [ids[i * 53 : i * 53 + PROMPT_TOKENS] for i in range(NUM_PROMPTS)]  # no shared prefix


@pytest.fixture(scope="module")
def expected(prompts, vllm_reference) -> list[list[int]]:
    return vllm_reference.greedy(prompts, MAX_TOKENS)


def run_round(pair, prompts, expected) -> None:
    prefill, decode = pair
    for prompt, want in zip(prompts, expected):
        tokens, _, _ = asyncio.run(generate(prefill, decode, prompt))
        assert tokens == want


def test_the_multiprocess_executor_transfers_token_exact(tier_pair, vllm_reference):
    prompts = [list(range(20, 20 + n)) for n in (5, 200)]  # under a block, and over one
    prefill, decode = tier_pair
    before = kv_stats(decode)
    run_round(tier_pair, prompts, vllm_reference.greedy(prompts, MAX_TOKENS))
    after = kv_stats(decode)
    assert after.transfers_received - before.transfers_received == len(prompts) and after.recomputes == before.recomputes


def test_evicted_blocks_come_back_from_the_tier_token_exact(tier_pair, prompts, expected):
    prefill, decode = tier_pair
    before, decode_before = kv_stats(prefill), kv_stats(decode)
    run_round(tier_pair, prompts, expected)  # fills the tier; each prompt evicts older ones from the engine
    run_round(tier_pair, prompts, expected)  # the early prompts' blocks are only in the tier now
    after = kv_stats(prefill)
    assert after.tier_blocks_stored - before.tier_blocks_stored == NUM_PROMPTS * 3
    # At least the prompts whose blocks two later prompts pushed out of the engine (4 blocks each).
    assert after.tier_blocks_loaded - before.tier_blocks_loaded >= (NUM_PROMPTS - ENGINE_BLOCKS // 4) * 3
    assert after.tier_checksum_failures == before.tier_checksum_failures
    # The decode worker decoded from the KV it received, tier blocks included: nothing recomputed.
    assert kv_stats(decode).recomputes == decode_before.recomputes
    # Routers watching the prefill worker learn which prefixes its tier holds, by their names.
    held = asyncio.run(prefix_cache_snapshot(prefill.address))
    assert {h for p in prompts for h in prompt_block_hashes(p, BLOCK)} <= set(held.tier_stored)


def test_a_corrupted_tier_block_is_recomputed_never_decoded(tier_pair, tier_dir, prompts, expected):
    prefill, decode = tier_pair
    run_round(tier_pair, prompts, expected)
    (tier_file,) = tier_dir.iterdir()
    with open(tier_file, "r+b") as f:  # every slot, behind the engine's back
        f.write(os.urandom(os.path.getsize(tier_file)))
    before, decode_before = kv_stats(prefill), kv_stats(decode)
    run_round(tier_pair, prompts, expected)
    after = kv_stats(prefill)
    failed = after.tier_checksum_failures - before.tier_checksum_failures
    assert failed >= 1 and after.tier_blocks_loaded == before.tier_blocks_loaded
    # Each prompt that met a bad block had its transfer failed, and the decode worker recomputed it.
    recomputed = kv_stats(decode).recomputes - decode_before.recomputes
    assert recomputed >= 1 and recomputed == after.transfers_failed - before.transfers_failed
    # The bad blocks were forgotten: computed again, stored anew, then served from the tier.
    run_round(tier_pair, prompts, expected)
    run_round(tier_pair, prompts, expected)
    assert kv_stats(prefill).tier_blocks_loaded > after.tier_blocks_loaded
