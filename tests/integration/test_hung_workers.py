"""Workers that freeze (SIGSTOP: alive, but silent) under the router. The router notices a
worker missing its health checks within seconds, stops waiting on it, and retries or resumes
the request elsewhere; the frozen worker aborts the request if it ever wakes up."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time

import httpx
import openai
import pytest

from pdcluster.common.tiny_model.generate import BENCH_MODEL, CORPUS, ensure_tiny_model

from tests.support.processes import running_cluster
from tests.support.router_metrics import metric

pytestmark = pytest.mark.slow

MODEL_NAME = BENCH_MODEL.cache_name
LONG_OUTPUT = 2000  # ~13 s at the bench model's ~150 tokens/s: the freeze lands mid-stream


@pytest.fixture(scope="module")
def cluster():
    model = ["--model", str(ensure_tiny_model(spec=BENCH_MODEL))]
    with running_cluster(
        prefill=2,
        decode=2,
        worker_args=[*model, "--dtype", "float32"],
        router_args=["--bypass-prefill-below", "32", *model, "--served-model-name", MODEL_NAME],
    ) as (router, workers):
        try:
            yield router, workers
        finally:
            for w in workers:  # a frozen worker cannot drain; wake it so it stops cleanly
                if w.process.poll() is None:
                    os.killpg(w.process.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def token_ids():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(spec=BENCH_MODEL))
    return tokenizer(CORPUS.read_text() * 2).input_ids


def freeze(worker) -> None:
    os.killpg(worker.process.pid, signal.SIGSTOP)  # the worker and its engine processes


def thaw(worker) -> None:
    os.killpg(worker.process.pid, signal.SIGCONT)


def view(http, worker) -> dict:
    return next(w for w in http.get("/cluster").json()["workers"] if w["address"] == worker.address)


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.5)


def complete(client, prompt: list[int], max_tokens: int, stream: bool = False):
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        return client.completions.create(stream=True, **kwargs)
    return client.completions.create(**kwargs).choices[0].text


def test_frozen_decode_worker_is_left_and_the_stream_resumed_exactly(cluster, token_ids):
    router, workers = cluster
    client = openai.OpenAI(base_url=router.record.http + "/v1", api_key="unused", max_retries=0, timeout=300)
    http = httpx.Client(base_url=router.record.http, timeout=60)
    prompt = token_ids[100:400]
    expected = complete(client, prompt, LONG_OUTPUT)
    resumes_before = metric(http, "pdcluster_router_resumes_total")
    pieces, frozen = [], None
    for chunk in complete(client, prompt, LONG_OUTPUT, stream=True):
        pieces.append(chunk.choices[0].text)
        if frozen is None and chunk.choices[0].text:
            serving = next(w["address"] for w in http.get("/cluster").json()["workers"] if w["role"] == "decode" and w["router_inflight"])
            frozen = next(w for w in workers if w.address == serving)
            freeze(frozen)
    assert frozen is not None
    try:
        assert "".join(pieces) == expected
        assert metric(http, "pdcluster_router_resumes_total") == resumes_before + 1
        assert not view(http, frozen)["healthy"]
    finally:
        thaw(frozen)
    # Awake again: it answers its checks, is routed to again, and dropped the abandoned request.
    wait_for(lambda: view(http, frozen)["healthy"] and view(http, frozen)["running"] == 0)


def test_frozen_prefill_worker_costs_a_retry_not_a_long_wait(cluster, token_ids):
    router, workers = cluster
    client = openai.OpenAI(base_url=router.record.http + "/v1", api_key="unused", max_retries=0, timeout=300)
    http = httpx.Client(base_url=router.record.http, timeout=60)
    wait_for(lambda: all(view(http, w)["healthy"] for w in workers))
    # Prompts no worker has seen (no prefix affinity), sent at once: the router spreads them
    # over both prefill workers, one of which is frozen before they arrive.
    prompts = [token_ids[start : start + 200] for start in (411, 523, 647, 769)]
    assert all(len(p) == 200 for p in prompts)
    retries_before = metric(http, "pdcluster_router_retries_total", 'role="prefill"')
    frozen = next(w for w in workers if w.role == "prefill")
    freeze(frozen)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(lambda p: complete(client, p, 16), prompts))
        assert metric(http, "pdcluster_router_retries_total", 'role="prefill"') >= retries_before + 1
        assert not view(http, frozen)["healthy"]
    finally:
        thaw(frozen)
    wait_for(lambda: view(http, frozen)["healthy"])
    # The answers equal those of the same prompts on the healed cluster.
    assert texts == [complete(client, p, 16) for p in prompts]


def test_a_structured_output_that_cannot_resume_fails_clearly(cluster, token_ids):
    """vLLM cannot start a grammar part-way through an output, so a constrained stream whose
    decode worker is lost ends with an error that says so, never with unconstrained text."""
    router, workers = cluster
    http = httpx.Client(base_url=router.record.http, timeout=60)
    wait_for(lambda: all(view(http, w)["healthy"] for w in workers))
    body = {
        "model": MODEL_NAME,
        "prompt": token_ids[900:1200],
        "max_tokens": LONG_OUTPUT,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "structured_outputs": {"regex": "[a-z ]+"},
    }
    texts, errors, frozen = [], [], None
    with http.stream("POST", "/v1/completions", json=body, timeout=300) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                errors.append(event["error"])
                continue
            texts.append(event["choices"][0]["text"])
            if frozen is None and texts[-1]:
                serving = next(
                    w["address"] for w in http.get("/cluster").json()["workers"] if w["role"] == "decode" and w["router_inflight"]
                )
                frozen = next(w for w in workers if w.address == serving)
                freeze(frozen)
    try:
        assert frozen is not None and len(errors) == 1
        assert errors[0]["code"] == 503 and "structured output cannot resume" in errors[0]["message"]
        assert re.fullmatch("[a-z ]*", "".join(texts))  # what was sent kept the constraint
    finally:
        thaw(frozen)
    wait_for(lambda: view(http, frozen)["healthy"])
