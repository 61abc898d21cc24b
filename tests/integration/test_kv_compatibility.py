"""Pools that drifted apart: a prefill worker on another checkpoint of the same model shape
(its KV has the decode worker's layout, dtype and size, so nothing in the transfer itself
would object) is never paired with the decode worker. The router names the field that
differs, counts it, and has the decode worker compute the prompt: the answers are the decode
model's own, as plain vLLM gives them, and no KV moves."""

from __future__ import annotations

import httpx
import pytest

from pdcluster.common.processes import start_process, stop_all, wait_ready
from pdcluster.common.tiny_model.generate import CORPUS, TinyModelSpec, ensure_tiny_model
from pdcluster.common.worker_record import Role

from tests.support.processes import EAGER, start_router
from tests.support.router_metrics import metric
from tests.support.worker_calls import worker_stats

pytestmark = pytest.mark.slow

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def drifted(shared_pair, shared_worker_args):
    """A prefill worker of the other checkpoint (otherwise the shared pair's flags, but a KV cache
    sized by vLLM's own flag), the shared decode worker, and a router in front of both."""
    other_checkpoint = ensure_tiny_model(spec=TinyModelSpec(seed=1))
    flags = ["--model", str(other_checkpoint), *shared_worker_args, *EAGER, "--kv-cache-memory-bytes", "128M"]
    prefill, decode = start_process(Role.PREFILL, flags), shared_pair[1]
    started = [prefill]
    try:
        wait_ready(prefill)
        started.append(start_router([prefill.address, decode.address], ["--bypass-prefill-below", "32"]))
        yield started[1], prefill, decode
    finally:
        stop_all(started)


def test_kv_of_another_checkpoint_is_refused_and_the_prompt_computed_where_it_decodes(drifted, vllm_reference, tokenizer):
    router, prefill, decode = drifted
    ids = tokenizer(CORPUS.read_text()).input_ids
    prompts = [ids[:200], ids[300:480]]
    received_before = worker_stats(decode.address).kv_bytes_received
    with httpx.Client(base_url=router.record.http, timeout=120) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
        answers = [http.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["token_ids"] for p in prompts]
        assert answers == vllm_reference.greedy(prompts, MAX_TOKENS)
        assert metric(http, "pdcluster_router_kv_incompatible_total", 'field="weights"') == len(prompts)
        assert metric(http, "pdcluster_router_prefill_bypass_total", 'reason="kv_incompatible"') == len(prompts)
        workers = {w["role"]: w["kv_compatibility"] for w in http.get("/cluster").json()["workers"]}
    # Everything else matches: the same engine settings and versions, only the weights differ.
    assert {k for k in workers["prefill"] if workers["prefill"][k] != workers["decode"][k]} == {"weights"}
    assert workers["decode"]["dtype"] == "float32" and workers["decode"]["pdcluster"] and workers["decode"]["vllm"]
    assert worker_stats(prefill.address).kv_bytes_sent == 0 and worker_stats(decode.address).kv_bytes_received == received_before
    log = router.log_tail(400)
    assert "cannot hand its KV to decode worker" in log and "(weights " in log


def test_vllms_kv_cache_memory_bytes_sizes_a_workers_cache(drifted):
    _, prefill, decode = drifted
    # The same model shape and dtype: 128 MiB of cache is half the decode worker's 256 MiB (the
    # tests' size, also by this flag); pdcluster's VLLM_CPU_KVCACHE_SPACE would have overridden both.
    assert 2 * worker_stats(prefill.address).total_kv_blocks == worker_stats(decode.address).total_kv_blocks
