"""Workers dying under the router: a decode worker SIGKILLed mid-stream is resumed on
another with the exact greedy text; a dead prefill worker costs a retry, not the request."""

from __future__ import annotations

import os
import signal

import httpx
import openai
import pytest

from pdcluster.common.tiny_model.generate import BENCH_MODEL, CORPUS, ensure_tiny_model

from tests.support.processes import running_cluster
from tests.support.router_metrics import metric

pytestmark = pytest.mark.slow

# The kill lands at the client's first chunk and must find the worker still generating. The
# tiny model's ~700 tokens/s, and once even 600 tokens of the bench model (~4 s), finished
# before a lagging test client saw its first chunk (the router then held every token). The
# bench model at ~150 tokens/s gives 3000 tokens ~20 s. Prompt + output < 4096.
MODEL_NAME = BENCH_MODEL.cache_name
MAX_TOKENS = 3000


@pytest.fixture(scope="module")
def cluster():
    model = ["--model", str(ensure_tiny_model(spec=BENCH_MODEL))]
    with running_cluster(
        prefill=1,
        decode=2,
        worker_args=[*model, "--dtype", "float32"],
        router_args=["--bypass-prefill-below", "32", *model, "--served-model-name", MODEL_NAME],
    ) as (router, workers):
        yield router, workers


@pytest.fixture(scope="module")
def prompt() -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(spec=BENCH_MODEL))
    return tokenizer.decode(tokenizer(CORPUS.read_text()).input_ids[500:800])


def complete(client, prompt: str, stream: bool, max_tokens: int = MAX_TOKENS):
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    if not stream:
        return client.completions.create(**kwargs).choices[0]
    return client.completions.create(stream=True, **kwargs)


def test_decode_killed_mid_stream_resumes_with_exact_text(cluster, prompt):
    router, workers = cluster
    client = openai.OpenAI(base_url=router.record.http + "/v1", api_key="unused", max_retries=0, timeout=300)
    expected = complete(client, prompt, stream=False)
    http = httpx.Client(base_url=router.record.http, timeout=60)
    resumes_before = metric(http, "pdcluster_router_resumes_total")

    pieces, logprobs, finish, killed = [], [], None, None
    for chunk in complete(client, prompt, stream=True):
        pieces.append(chunk.choices[0].text)
        logprobs += chunk.choices[0].logprobs.token_logprobs
        finish = chunk.choices[0].finish_reason or finish
        if killed is None and chunk.choices[0].text:
            # The decode worker serving this stream: the one the router has a request on.
            serving = next(w["address"] for w in http.get("/cluster").json()["workers"] if w["role"] == "decode" and w["router_inflight"])
            killed = next(w for w in workers if w.address == serving)
            os.kill(killed.process.pid, signal.SIGKILL)
            killed_after = len(pieces)
    assert killed is not None and killed.process.wait(10) == -signal.SIGKILL
    assert "".join(pieces) == expected.text
    # The tokens the new worker generated carry their logprobs too, as an unbroken stream would.
    assert len(logprobs) == MAX_TOKENS and all(abs(a - b) < 1e-4 for a, b in zip(logprobs, expected.logprobs.token_logprobs))
    assert finish == "length"
    assert metric(http, "pdcluster_router_resumes_total") == resumes_before + 1, f"killed after {killed_after} chunks"
    dead = next(w for w in http.get("/cluster").json()["workers"] if w["address"] == killed.address)
    assert not dead["healthy"]
    assert http.get("/health").status_code == 200  # one decode worker is enough


def test_dead_prefill_worker_costs_a_retry_not_the_request(cluster, prompt):
    router, workers = cluster
    client = openai.OpenAI(base_url=router.record.http + "/v1", api_key="unused", max_retries=0, timeout=300)
    expected = complete(client, prompt, stream=False, max_tokens=32)  # no mid-stream kill here: a short answer will do
    http = httpx.Client(base_url=router.record.http, timeout=60)
    prefill = next(w for w in workers if w.role == "prefill")
    os.kill(prefill.process.pid, signal.SIGKILL)
    prefill.process.wait(10)
    # Routed before or after the router notices: either way the decode worker computes the prompt.
    assert complete(client, prompt, stream=False, max_tokens=32).text == expected.text
    assert metric(http, "pdcluster_router_prefill_bypass_total", 'reason="no_prefill_worker"') >= 1
    assert http.get("/health").status_code == 503  # no prefill worker left


def test_a_decode_worker_drains_its_running_stream_on_sigterm(cluster, prompt):
    """SIGTERM: the worker takes nothing new and finishes what runs, then exits 0. The stream
    completes on it whole, not resumed elsewhere. (Last here: it leaves no decode worker.)"""
    router, workers = cluster
    client = openai.OpenAI(base_url=router.record.http + "/v1", api_key="unused", max_retries=0, timeout=300)
    http = httpx.Client(base_url=router.record.http, timeout=60)
    (decode,) = [w for w in workers if w.role == "decode" and w.process.poll() is None]
    expected = complete(client, prompt, stream=False, max_tokens=1000)
    resumes_before = metric(http, "pdcluster_router_resumes_total")
    pieces, finish, signalled = [], None, False
    for chunk in complete(client, prompt, stream=True, max_tokens=1000):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
        if not signalled and chunk.choices[0].text:
            decode.process.send_signal(signal.SIGTERM)
            signalled = True
    assert signalled and "".join(pieces) == expected.text and finish == "length"
    assert metric(http, "pdcluster_router_resumes_total") == resumes_before  # finished where it ran
    assert decode.process.wait(60) == 0
