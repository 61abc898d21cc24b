"""The router's public APIs against a live local cluster (real engines, real gRPC/HTTP):
OpenAI completions and chat, the gRPC Inference service, bad input, disconnects,
admission control and API keys, and OpenTelemetry traces (a real OTLP receiver)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai
import pytest

from pdcluster.bench.trace_receiver import ReceivedSpan
from pdcluster.common.engine_profile import load_profile
from pdcluster.common.processes import stop_all
from pdcluster.common.tiny_model.generate import CORPUS
from pdcluster.planner.serving_path import LENGTHS, serving_path_through
from pdcluster.protos import inference_pb2 as ipb
from pdcluster.protos import inference_pb2_grpc as igrpc
from pdcluster.protos import worker_pb2 as wpb
from pdcluster.protos import worker_pb2_grpc as wgrpc

from tests.support.paths import ROOT, TRACES
from tests.support.processes import start_router, start_routers
from tests.support.router_metrics import metric
from tests.support.worker_calls import kv_stats, worker_channel, worker_stats

pytestmark = pytest.mark.slow

BYPASS_BELOW = 32
MAX_TOKENS = 24
MODEL = "tiny-llama-v2-s0"
# vLLM's own flag, passed through the router to vLLM's OpenAI layer.
SERVED_AS = ["--served-model-name", MODEL]
PREDICTING_PROFILE = ROOT / "bench" / "profiles" / "cpu1-bench-llama.json"


@pytest.fixture(scope="module")
def cluster(shared_pair, traces):
    tracing = ["--otlp-traces-endpoint", traces.endpoint]  # vLLM's flag: the router exports there, as the engines do
    router = start_router([w.address for w in shared_pair], ["--bypass-prefill-below", str(BYPASS_BELOW), *SERVED_AS, *tracing])
    try:
        yield router, list(shared_pair)
    finally:
        router.stop()


@pytest.fixture(scope="module")
def http(cluster):
    router, _ = cluster
    with httpx.Client(base_url=router.record.http, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=router_url(cluster) + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def routers(cluster, tmp_path_factory, redis_url) -> dict:
    """More routers in front of the cluster's workers, each for one test below and set up as it
    needs, started together: a router's start is seconds of imports on one core, and the two
    cores import two at a time."""
    tenants_file = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants_file.write_text(json.dumps(TENANTS))  # YAML, as a mounted Secret holds it
    tenants = ["--tenants-file", str(tenants_file), "--api-key", "admin", "--response-cache-url", redis_url]
    each = {
        "local prefill": ["--bypass-prefill-below", "1000000"],
        "responses": [],
        "drained": [],
        "admission": ["--max-inflight", "1", "--max-queue", "1", "--api-key", "s3cret"],
        "prefill backlog": ["--bypass-prefill-below", str(BYPASS_BELOW), "--local-prefill-above-queued", "1"],
        "predicted": ["--bypass-prefill-below", str(BYPASS_BELOW), "--profile", str(PREDICTING_PROFILE), "--slo-ttft-ms", "5"],
        "tenants": [*tenants, "--cost-per-hour-prefill", "4", "--cost-per-hour-decode", "6", "--max-inflight", "1", "--max-queue", "16"],
    }
    # vLLM's response store, for the chain of responses; the other tests never ask it.
    store = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    started = start_routers([w.address for w in cluster[1]], [[*args, *SERVED_AS] for args in each.values()], env=store)
    try:
        yield dict(zip(each, started))
    finally:
        stop_all(started)


def router_url(cluster) -> str:
    return cluster[0].record.http


@pytest.fixture(scope="module")
def long_prompt(tokenizer) -> str:
    """Long enough for remote prefill and a multi-block transfer."""
    text = CORPUS.read_text()
    ids = tokenizer(text).input_ids[:300]
    return tokenizer.decode(ids)


SHORT_PROMPT = "The old mill"


def grpc_stub(cluster):
    channel = grpc.insecure_channel(cluster[0].record.grpc)
    return channel, igrpc.InferenceStub(channel)


def test_health_models_and_cluster(http, cluster, model_dir):
    assert http.get("/health").status_code == 200
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL
    workers = http.get("/cluster").json()["workers"]
    assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
    expected_keys = {"id", "role", "address", "healthy", "pid", "running", "queued", "free_kv_blocks", "kv_bytes_sent", "kv_bytes_received"}
    for w in workers:
        assert expected_keys <= set(w)
        assert w["healthy"] and w["pid"] > 0 and w["free_kv_blocks"] > 0
    assert {w["pid"] for w in workers} == {p.process.pid for p in cluster[1]}


@pytest.mark.parametrize("which", ["long", "short"])
def test_completion_streamed_equals_unary_and_grpc_equals_reference(which, client, http, cluster, tokenizer, long_prompt, vllm_reference):
    prompt = long_prompt if which == "long" else SHORT_PROMPT
    prompt_ids = tokenizer(prompt).input_ids
    decode_worker = next(w for w in cluster[1] if w.role == "decode")
    received_before = kv_stats(decode_worker).bytes_received  # the worker's own count, not the router's last poll
    bypass_before = metric(http, "pdcluster_router_prefill_bypass_total")

    unary = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    assert unary.usage.prompt_tokens == len(prompt_ids)
    assert unary.usage.completion_tokens == MAX_TOKENS
    assert unary.usage.total_tokens == len(prompt_ids) + MAX_TOKENS
    assert unary.choices[0].finish_reason == "length"

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and chunks[-1].usage.prompt_tokens == len(prompt_ids)

    channel, stub = grpc_stub(cluster)
    with channel:
        request = ipb.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        replies = list(stub.Generate(request))
        whole = stub.Complete(request)
    assert "".join(r.text for r in replies) == whole.text == unary.choices[0].text
    token_ids = [t for r in replies for t in r.token_ids]
    assert token_ids == list(whole.token_ids)
    assert replies[-1].finish_reason == "length" and replies[-1].usage.completion_tokens == MAX_TOKENS
    assert replies[-1].usage.prompt_tokens == len(prompt_ids)
    assert token_ids == vllm_reference.greedy([prompt_ids], MAX_TOKENS, ignore_eos=True)[0]

    kv = kv_stats(decode_worker)
    moved = kv.bytes_received - received_before
    bypassed = metric(http, "pdcluster_router_prefill_bypass_total") - bypass_before
    if which == "long":  # 4 requests, each through remote prefill and a KV transfer
        assert moved > 0 and bypassed == 0
        assert set(kv.bytes_received_by_transport) == {"nixl"}  # both ends have NIXL: auto took it
        decode = [w for w in http.get("/cluster").json()["workers"] if w["role"] == "decode"]
        assert [w["kv_transport"] for w in decode] == ["auto"]
    else:
        assert moved == 0 and bypassed == 4


# One disaggregated request's spans: the router's, both sides of both RPCs, each engine's
# (vLLM's llm_request) and the KV transfer's two ends.
TRACED = {"router.request": 1, "pdcluster.v1.Worker/Prefill": 2, "pdcluster.v1.Worker/Decode": 2, "llm_request": 2}
TRACED |= {"kv_transfer.send": 1, "kv_transfer.receive": 1}
SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # OTLP's span kinds


def test_one_request_is_one_trace_across_router_workers_engines_and_kv_transfer(cluster, traces, long_prompt):
    """The caller's W3C trace context, over HTTP and over the gRPC front door, is the parent of
    one trace that spans every process a disaggregated request touches."""
    callers = {secrets.token_hex(16): secrets.token_hex(8) for _ in range(2)}
    (http_trace, http_caller), (grpc_trace, grpc_caller) = callers.items()
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(
        router_url(cluster) + "/v1/completions", json=body, headers={"traceparent": f"00-{http_trace}-{http_caller}-01"}, timeout=60
    )
    assert reply.status_code == 200
    channel, stub = grpc_stub(cluster)
    with channel:
        request = ipb.GenerateRequest(prompt=long_prompt, max_tokens=4, temperature=0.0, ignore_eos=True)
        stub.Complete(request, metadata=[("traceparent", f"00-{grpc_trace}-{grpc_caller}-01")])

    def arrived(spans: list[ReceivedSpan]) -> bool:
        return all(sum(s.trace_id == t and s.name in TRACED for s in spans) >= sum(TRACED.values()) for t in callers)

    traces.wait_for(arrived)
    for trace_id, caller in callers.items():
        spans = traces.spans(trace_id)
        named = {name: [s for s in spans if s.name == name] for name in TRACED}
        assert {name: len(found) for name, found in named.items()} == TRACED, f"trace {trace_id}: {[s.name for s in spans]}"
        # One tree: every span's parent is in the trace, but the root's, which is the caller's.
        ids = {s.span_id for s in spans}
        assert [s.name for s in spans if s.parent_id not in ids] == ["router.request"]
        (root,) = named["router.request"]
        assert root.parent_id == caller and root.service == "pdcluster-router" and root.kind == SERVER
        assert root.attributes["gen_ai.usage.completion_tokens"] == 4 and "first_token" in root.events
        server = {}
        for method, role in (("Prefill", "prefill"), ("Decode", "decode")):
            client_side = next(s for s in named[f"pdcluster.v1.Worker/{method}"] if s.kind == CLIENT)
            server_side = next(s for s in named[f"pdcluster.v1.Worker/{method}"] if s.kind == SERVER)
            assert client_side.parent_id == root.span_id and client_side.service == "pdcluster-router"
            assert server_side.parent_id == client_side.span_id and server_side.service == f"pdcluster-{role}"
            assert server_side.start_ns >= client_side.start_ns
            server[role] = server_side
            # vLLM's own request span, in the engine's process, under the RPC it served.
            (engine,) = [s for s in named["llm_request"] if s.service == f"pdcluster-{role}"]
            assert engine.parent_id == server_side.span_id
            assert engine.attributes["gen_ai.usage.prompt_tokens"] == root.attributes["gen_ai.usage.prompt_tokens"]
        (send,), (receive,) = named["kv_transfer.send"], named["kv_transfer.receive"]
        assert (send.parent_id, send.kind, send.service) == (server["prefill"].span_id, PRODUCER, "pdcluster-prefill")
        assert (receive.parent_id, receive.kind, receive.service) == (server["decode"].span_id, CONSUMER, "pdcluster-decode")
        assert send.attributes["pdcluster.transfer_id"] == receive.attributes["pdcluster.transfer_id"]
        assert send.attributes["pdcluster.kv_transport"] == receive.attributes["pdcluster.kv_transport"] == "nixl"
        assert send.attributes["pdcluster.kv_bytes"] > 0 and not send.error and not receive.error
        # NIXL's handshake: the consumer's target blocks and agent, asked for under the send.
        assert [s.parent_id for s in spans if s.name == "kv_transfer.nixl_handshake"] == [send.span_id]


def test_the_profilers_serving_path_measurement_through_both_paths(cluster, routers, tokenizer):
    """`pdcluster profile`'s serving path, measured as it measures it: requests one at a time
    through a router that prefills remotely (this cluster's) and one that computes every prompt
    on the decode worker, each less the step model's prediction for it alone."""
    local = routers["local prefill"]
    try:
        urls = {True: router_url(cluster), False: local.record.http}
        profile = load_profile(ROOT / "bench" / "profiles" / "cpu2-tiny.json")  # this model's, measured here
        path, samples = serving_path_through(urls, profile, len(tokenizer), repeats=2)
    finally:
        local.stop()
    assert {s["prompt_tokens"] for s in samples["remote"]} == {s["prompt_tokens"] for s in samples["local"]} == set(LENGTHS)
    assert len(samples["remote"]) == len(samples["local"]) == 2 * len(LENGTHS)
    # Both paths cost something beyond the engines' steps. (Which costs more is the profile's
    # to measure, not this test's: under load either can.)
    assert path.remote_request_s > 0 and path.request_s > 0
    for s in samples["remote"] + samples["local"]:
        assert s["ttft_s"] > 0 and s["predicted_ttft_s"] > 0


def test_a_worker_started_for_one_role_refuses_to_switch(cluster):
    async def switch(address: str) -> None:
        async with worker_channel(address) as channel:
            await wgrpc.WorkerStub(channel).SwitchRole(wpb.SwitchRoleRequest(role="decode"), timeout=60)

    prefill = next(w for w in cluster[1] if w.role == "prefill")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(switch(prefill.address))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "role switching" in refused.value.details()


def test_chat_streamed_equals_unary(client, tokenizer):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where does the river flow?"}]
    unary = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_prompt = tokenizer(templated, add_special_tokens=False).input_ids
    assert unary.usage.prompt_tokens == len(expected_prompt)
    assert unary.usage.completion_tokens == MAX_TOKENS
    assert unary.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == unary.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_session_id_reaches_routing_however_vllm_takes_it(cluster, http, client):
    """vLLM's X-Session-ID header, its `session_id` field and the gRPC field: one conversation."""

    def turns(outcome: str) -> float:
        return metric(http, "pdcluster_router_session_turns_total", f'outcome="{outcome}"')

    new, kept = turns("new"), turns("kept")
    session = f"chat-{secrets.token_hex(4)}"
    client.completions.create(model=MODEL, prompt=SHORT_PROMPT, max_tokens=2, extra_headers={"X-Session-ID": session})
    messages = [{"role": "user", "content": "And then?"}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body={"session_id": session})
    channel, stub = grpc_stub(cluster)
    with channel:
        list(stub.Generate(ipb.GenerateRequest(prompt=SHORT_PROMPT, max_tokens=2, session_id=session)))
    assert (turns("new") - new, turns("kept") - kept) == (1, 2)


def test_a_chain_of_responses_keeps_its_decode_worker(routers):
    """The Responses API's previous_response_id alone (no session id) is a conversation too."""
    router = routers["responses"]
    try:
        with httpx.Client(base_url=router.record.http, timeout=120) as http:

            def turn(text: str, previous: str | None) -> str:
                body = {"model": MODEL, "input": text, "max_output_tokens": 4, "temperature": 0}
                if previous:
                    body["previous_response_id"] = previous
                response = http.post("/v1/responses", json=body)
                assert response.status_code == 200, response.text
                return response.json()["id"]

            first = turn("The old mill", None)
            second = turn("And then?", first)
            turn("And after that?", second)
            # The first turn starts the chain; each later one finds the worker its previous response ran on.
            assert metric(http, "pdcluster_router_session_turns_total", 'outcome="kept"') == 2
            assert metric(http, "pdcluster_router_session_turns_total", 'outcome="new"') == 0
    finally:
        router.stop()


def test_n_seed_and_stop(client, long_prompt):
    many = client.completions.create(
        model=MODEL, prompt=long_prompt, max_tokens=8, temperature=1.0, seed=3, n=3, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.text for c in many.choices}) == 3  # distinct samples (vLLM seeds each one)
    assert many.usage.completion_tokens == 3 * 8
    sampled = [
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=12, temperature=1.0, seed=7).choices[0].text for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
    full = (
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def _error(response, status: int) -> dict:
    """vLLM's error shape: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["message"] and body["type"] and body["code"] == status
    return body


def test_bad_input_over_grpc(cluster, http):
    channel, stub = grpc_stub(cluster)
    cases = [
        (ipb.GenerateRequest(max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
        (ipb.GenerateRequest(prompt="hi", prompt_token_ids=[1], max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
        (ipb.GenerateRequest(prompt="hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (ipb.GenerateRequest(prompt="hi", top_k=-5), grpc.StatusCode.INVALID_ARGUMENT),
        (ipb.GenerateRequest(prompt="hi", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT),
        (ipb.GenerateRequest(prompt="hi", model="gpt-9"), grpc.StatusCode.NOT_FOUND),
        (ipb.GenerateRequest(prompt="river " * 5000), grpc.StatusCode.INVALID_ARGUMENT),
        (ipb.GenerateRequest(prompt_token_ids=[10**9]), grpc.StatusCode.INVALID_ARGUMENT),
        (ipb.GenerateRequest(messages=[ipb.ChatMessage(role="user", content="hi")], max_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    with channel:
        for request, code in cases:
            for call in (lambda r: list(stub.Generate(r)), stub.Complete):
                with pytest.raises(grpc.RpcError) as e:
                    call(request)
                assert e.value.code() == code, (request, e.value)
                assert e.value.details()
        assert stub.Complete(ipb.GenerateRequest(prompt="hi", max_tokens=3, temperature=0.0)).usage.completion_tokens >= 1
    assert http.get("/health").status_code == 200


def test_client_disconnect_aborts_on_workers(cluster, http, long_prompt):
    """The workers themselves stop generating: a request left to run would generate all of
    its 3000 tokens on its decode worker."""
    url = cluster[0].record.http
    decoders = [w.address for w in cluster[1] if worker_stats(w.address).role == "decode"]
    generated_before = sum(worker_stats(a).generation_tokens for a in decoders)
    cancelled_before = metric(http, "pdcluster_router_requests_total", 'outcome="cancelled"')
    body = json.dumps({"prompt": long_prompt, "max_tokens": 3000, "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    sock.settimeout(60)
    while b"data: " not in received:  # the headers may come alone, before the first token
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    sock.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = http.get("/cluster").json()["workers"]
        if all(w["running"] == 0 and w["router_inflight"] == 0 and w["free_kv_blocks"] == w["total_kv_blocks"] for w in workers):
            break
        time.sleep(0.5)
    assert all(w["running"] == 0 and w["free_kv_blocks"] == w["total_kv_blocks"] for w in workers), workers
    assert metric(http, "pdcluster_router_requests_total", 'outcome="cancelled"') == cancelled_before + 1
    generated = sum(worker_stats(a).generation_tokens for a in decoders) - generated_before
    assert 0 < generated < 3000, generated


def _raw_post(url: str, headers: list[str], body_parts) -> tuple[int, dict]:
    """POST over a plain socket, sending the whole body before reading the answer, as a client
    that does not stop for an early response does."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            (
                "\r\n".join(["POST /v1/completions HTTP/1.1", f"Host: {host}", "Content-Type: application/json", *headers]) + "\r\n\r\n"
            ).encode()
        )
        for part in body_parts:
            sock.sendall(part)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return int(head.split()[1]), json.loads(body)


def test_oversized_bodies_get_a_readable_413(http, cluster):
    url = cluster[0].record.http
    body = b"x" * (8 << 20)  # the limit is 4 MiB; the socket buffers hold far less than this
    status, answer = _raw_post(url, [f"Content-Length: {len(body)}", "Connection: close"], [body])
    assert status == 413 and answer["error"]["code"] == 413 and "exceeds" in answer["error"]["message"]
    chunks = [b"%x\r\n%s\r\n" % (1 << 20, b"y" * (1 << 20)) for _ in range(8)] + [b"0\r\n\r\n"]
    status, answer = _raw_post(url, ["Transfer-Encoding: chunked", "Connection: close"], chunks)
    assert status == 413 and answer["error"]["type"] == "Request Entity Too Large"
    assert http.get("/health").status_code == 200


def test_router_drains_on_sigterm(routers, long_prompt):
    router = routers["drained"]
    try:
        url = router.record.http
        request = {
            "model": MODEL,
            "prompt": long_prompt,
            "max_tokens": 2000,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # A gRPC stream is running too when the signal comes: it must finish whole as well.
        grpc_finished: dict[str, int] = {}
        first_grpc_reply = threading.Event()

        def grpc_stream() -> None:
            with grpc.insecure_channel(router.record.grpc) as channel:
                request = ipb.GenerateRequest(prompt=long_prompt, max_tokens=1000, temperature=0, ignore_eos=True)
                for reply in igrpc.InferenceStub(channel).Generate(request, timeout=300):
                    first_grpc_reply.set()
                    if reply.finish_reason:
                        grpc_finished["tokens"] = reply.usage.completion_tokens

        streaming = threading.Thread(target=grpc_stream)
        streaming.start()
        assert first_grpc_reply.wait(120)
        events = []
        with httpx.Client(base_url=url, timeout=120) as http, http.stream("POST", "/v1/completions", json=request) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line.removeprefix("data: "))
                if len(events) == 1:
                    router.process.send_signal(signal.SIGTERM)
                    time.sleep(0.5)
                    with pytest.raises(httpx.ConnectError):  # no new requests once draining
                        httpx.get(url + "/health", timeout=5)
                    with grpc.insecure_channel(router.record.grpc) as channel, pytest.raises(grpc.RpcError) as refused:
                        igrpc.InferenceStub(channel).Complete(ipb.GenerateRequest(prompt="hi", max_tokens=2), timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # nor on gRPC
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 2000  # the stream finished whole
        streaming.join(300)
        assert grpc_finished == {"tokens": 1000}
        assert router.process.wait(60) == 0
    finally:
        router.stop()


def test_admission_control_and_api_key(routers, long_prompt):
    router = routers["admission"]
    try:
        url = router.record.http
        with httpx.Client(base_url=url, timeout=120) as http:
            assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 401  # vLLM's own key check
            _error(http.get("/cluster"), 401)
            assert http.get("/health").status_code == 200  # probes need no key
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        statuses: list[int] = []

        def one() -> None:
            try:
                client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=200, temperature=0, extra_body={"ignore_eos": True})
                statuses.append(200)
            except openai.RateLimitError as e:
                assert e.status_code == 429 and "capacity" in e.message
                statuses.append(429)

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # One runs, one waits, the rest are turned away at once; the admitted ones finish.
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        channel = grpc.insecure_channel(router.record.grpc)
        with channel:
            stub = igrpc.InferenceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.Complete(ipb.GenerateRequest(prompt="hi", max_tokens=2))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Complete(ipb.GenerateRequest(prompt="hi", max_tokens=2), metadata=[("authorization", "Bearer s3cret")])
            assert reply.usage.completion_tokens >= 1
            # The same admission on gRPC: past the queue, RESOURCE_EXHAUSTED with the reason.
            codes: list[grpc.StatusCode] = []

            def one_grpc() -> None:
                request = ipb.GenerateRequest(prompt=long_prompt, max_tokens=200, temperature=0, ignore_eos=True)
                try:
                    stub.Complete(request, metadata=[("authorization", "Bearer s3cret")], timeout=120)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    assert e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "capacity" in e.details()
                    codes.append(e.code())

            threads = [threading.Thread(target=one_grpc) for _ in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1 and codes.count(grpc.StatusCode.OK) >= 2, codes
    finally:
        router.stop()


def concurrent_texts(router, kwargs: dict, count: int) -> list[str]:
    """`count` copies of one completion request sent at once to `router`; their texts."""
    client = openai.OpenAI(base_url=router.record.http + "/v1", api_key="unused", max_retries=0, timeout=120)
    texts: list[str] = []
    threads = [threading.Thread(target=lambda: texts.append(client.completions.create(**kwargs).choices[0].text)) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return texts


def test_prefill_backlog_runs_prompts_on_the_decode_worker(routers, client, long_prompt):
    """With --local-prefill-above-queued, prompts that arrive while the prefill worker is busy
    are computed on the decode worker instead, with the same greedy text."""
    kwargs = dict(model=MODEL, prompt=long_prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**kwargs).choices[0].text
    router = routers["prefill backlog"]
    try:
        with httpx.Client(base_url=router.record.http, timeout=60) as http:
            # This router polls the workers once a second: until it sees the prefill worker idle
            # again after the request above, every prompt would count as arriving behind it.
            deadline = time.monotonic() + 30
            while any(w["role"] == "prefill" and (w["running"] or w["queued"]) for w in http.get("/cluster").json()["workers"]):
                assert time.monotonic() < deadline, "the prefill worker never looked idle"
                time.sleep(0.2)
            time.sleep(1.5)  # and a poll after that, with the worker's queued prompt tokens at 0
        assert concurrent_texts(router, kwargs, 6) == [expected] * 6
        with httpx.Client(base_url=router.record.http, timeout=60) as http:
            # The first prompt goes to the idle prefill worker; some of the rest arrive behind it.
            assert metric(http, "pdcluster_router_worker_picks_total", 'role="prefill"') >= 1
            assert metric(http, "pdcluster_router_prefill_bypass_total", 'reason="prefill_backlog"') >= 1
    finally:
        router.stop()


def test_predicted_placement_serves_the_same_answers_and_reports_its_predictions(routers, client, long_prompt):
    """With --profile, each prompt goes where the SLOs are best kept (here a 5 ms TTFT SLO no
    prompt keeps: the smaller overshoot wins); every one is counted by what decided it, and
    its observed TTFT against the prediction."""
    kwargs = dict(model=MODEL, prompt=long_prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**kwargs).choices[0].text
    router = routers["predicted"]
    try:
        assert concurrent_texts(router, kwargs, 6) == [expected] * 6
        with httpx.Client(base_url=router.record.http, timeout=60) as http:
            placements = "pdcluster_router_placements_total"
            # (Prometheus writes labels in name order.)
            remote, local = (metric(http, placements, f'basis="prediction",placement="{where}"') for where in ("remote", "local"))
            assert remote + local == 6
            assert local == metric(http, "pdcluster_router_prefill_bypass_total", 'reason="predicted"')
            assert metric(http, "pdcluster_router_worker_picks_total", 'role="prefill"') == 6 - local
            assert metric(http, placements, 'basis="prediction",placement="remote",predicted_slos="kept"') == 0  # 5 ms: none kept
            # One observation per first token, under the placement it was predicted for.
            assert metric(http, "pdcluster_router_ttft_prediction_ratio_count") == 6
            assert metric(http, "pdcluster_router_ttft_prediction_error_seconds_count") == 6
            assert metric(http, "pdcluster_router_ttft_prediction_ratio_sum") > 0
    finally:
        router.stop()


def test_bench_serve_measures_an_open_loop_sweep(cluster, http, tmp_path):
    from pdcluster.bench.serve_bench import main as bench_serve
    from pdcluster.planner.workloads import Workload

    json_path, png_path = tmp_path / "serve.json", tmp_path / "serve.png"
    served_before = metric(http, "pdcluster_router_requests_total", 'outcome="ok"')
    workload = Workload(prompt_tokens=120, output_tokens=8, distribution="fixed", prefix_share=0.5, prefix_groups=2, seed=3)
    results = bench_serve(
        router_url(cluster), [2.0, 8.0], 6, workload, json_path=str(json_path), plot_path=str(png_path), quiet=True, cost_per_hour=3.6
    )
    assert [r.rate for r in results] == [2.0, 8.0]
    for r in results:
        assert (r.requests, r.completed, r.failed) == (6, 6, 0), r.errors
        # $3.60/h is $0.001/s: the run's cost over the tokens it served. (duration_s is rounded
        # to the ms: on a run this short that alone moves the cost by up to 0.2%.)
        cost, rel = 3.6 * r.duration_s / 3600, 1e-3 + 0.0005 / r.duration_s
        assert r.cost_usd_per_million_tokens["output"] == pytest.approx(cost / (6 * 8) * 1e6, rel=rel)
        assert r.cost_usd_per_million_tokens["input"] == pytest.approx(cost / (6 * 120) * 1e6, rel=rel)
        assert r.output_tok_per_s > 0
        assert round(r.slo_attainment * 6) + sum(r.slo_misses.values()) == 6  # each request within, or what it missed
        assert r.ttft_ms["p50"] <= r.ttft_ms["p99"] and r.e2e_ms["p50"] <= r.e2e_ms["p99"]
        assert r.ttft_ms["p99"] <= r.e2e_ms["p99"]
    assert metric(http, "pdcluster_router_requests_total", 'outcome="ok"') == served_before + 12  # every request reached the router
    report = json.loads(json_path.read_text())
    assert report["model"] == MODEL and len(report["results"]) == 2
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Seeded: the same workload twice gives the same prompts.
    assert [s.prompt_tokens(977) for s in workload.shapes(4, 2.0)] == [s.prompt_tokens(977) for s in workload.shapes(4, 2.0)]
    shared = {tuple(s.prompt_tokens(977)[:60]) for s in workload.shapes(20, 2.0)}
    assert len(shared) == 2  # prefix-sharing mode: every prompt starts with one of 2 prefixes


def test_bench_serve_replays_a_mooncake_trace_with_its_shared_prefixes(cluster, http):
    """`bench serve --trace`: the trace's arrivals and lengths, scaled; equal hash ids are equal
    token prefixes, which the workers' prefix caches then hit."""
    from pdcluster.bench.serve_bench import main as bench_serve
    from pdcluster.planner.workloads import TraceScaling, Workload, load_trace

    # 512-token hash blocks scaled to 128 tokens: one KV block of the tiny model's engines.
    trace = load_trace(str(TRACES / "mooncake_conversation_head.jsonl"), "mooncake", TraceScaling(0.25, 0.001, 8, 4096))
    assert trace[0].prefix_blocks[0] == trace[1].prefix_blocks[0]  # the trace's first two share their first block
    first, second = (t.prompt_tokens(977) for t in trace[:2])
    block = trace[0].block_tokens
    assert first[:block] == second[:block] and first[block : 2 * block] != second[block : 2 * block]
    cached_before = metric(http, "pdcluster_router_prefix_hit_tokens_total")
    results = bench_serve(router_url(cluster), [], 0, Workload(), trace=trace, quiet=True)
    assert len(results) == 1 and (results[0].requests, results[0].completed) == (8, 8), results[0].errors
    assert trace[-1].arrival_s == 0.0 and results[0].rate == 8.0  # the trace's first 8 arrive together
    assert metric(http, "pdcluster_router_prefix_hit_tokens_total") > cached_before


def test_vllm_bench_serve_runs_against_the_router_unmodified(cluster, model_dir, tmp_path):
    """vLLM's own benchmark client, as users run it against an OpenAI-compatible server."""
    vllm_cli = os.path.join(os.path.dirname(sys.executable), "vllm")
    cmd = [
        vllm_cli,
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        router_url(cluster),
        "--model",
        MODEL,
        "--tokenizer",
        model_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        "64",
        "--random-output-len",
        "8",
        "--num-prompts",
        "8",
        "--request-rate",
        "4",
        "--ignore-eos",
        "--seed",
        "0",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "vllm_bench.json",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "vllm_bench.json").read_text())
    assert result["completed"] == 8 and result["total_output_tokens"] == 8 * 8


TENANTS = [
    {"name": "acme", "api_keys": ["k-acme"], "response_cache": True},
    {"name": "solo", "api_keys": ["k-solo"], "max_concurrent": 1},
    {"name": "bursty", "api_keys": ["k-bursty"]},
    {"name": "beta", "api_keys": ["k-beta"], "tokens_per_minute": 150},
    {"name": "gamma", "api_keys": ["k-gamma"], "models": ["another-model"]},
]


def test_tenants_limits_fair_turns_usage_and_the_response_cache(routers):
    from pdcluster.bench.serve_bench import BenchTenant
    from pdcluster.bench.serve_bench import main as bench_serve
    from pdcluster.planner.workloads import Workload

    router = routers["tenants"]
    served: dict[str, list] = {}  # what each tenant was told it used

    def complete(key: str, **kwargs) -> httpx.Response:
        body = {"model": MODEL, "prompt": "The old mill", "max_tokens": 16, "temperature": 0, **kwargs}
        response = http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
        if response.status_code == 200:
            served.setdefault(key, []).append(response.json()["usage"])
        return response

    try:
        with httpx.Client(base_url=router.record.http, timeout=120) as http:
            # A model the tenant may not use: 403, on both front doors.
            assert _error(complete("k-gamma"), 403)["message"] == f"tenant gamma may not use the model {MODEL}"
            with grpc.insecure_channel(router.record.grpc) as channel:
                with pytest.raises(grpc.RpcError) as e:
                    igrpc.InferenceStub(channel).Complete(
                        ipb.GenerateRequest(prompt="hi", max_tokens=2), metadata=[("authorization", "Bearer k-gamma")]
                    )
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(grpc.RpcError) as e:  # a cache word neither on nor off
                    igrpc.InferenceStub(channel).Complete(
                        ipb.GenerateRequest(prompt="hi", max_tokens=2),
                        metadata=[("authorization", "Bearer k-acme"), ("x-response-cache", "sometimes")],
                    )
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-response-cache is on or off" in e.value.details()
            assert metric(http, "pdcluster_tenant_refusals_total", 'reason="model",tenant="gamma"') == 2
            unclear = http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "hi"},
                headers={"authorization": "Bearer k-acme", "x-response-cache": "sometimes"},
            )
            assert "x-response-cache is on or off" in _error(unclear, 400)["message"]

            # The response cache: a greedy repeat is the same answer, from Redis; a sampled one never is.
            first = complete("k-acme")
            assert first.headers["x-response-cache"] == "miss"
            again = complete("k-acme")
            assert again.headers["x-response-cache"] == "hit" and again.json()["choices"] == first.json()["choices"]
            body = {"model": MODEL, "prompt": "The old mill", "max_tokens": 16, "temperature": 0, "stream": True}
            body["stream_options"] = {"include_usage": True}
            streamed = http.post("/v1/completions", json=body, headers={"authorization": "Bearer k-acme"})
            assert streamed.headers["x-response-cache"] == "hit"
            chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == first.json()["choices"][0]["text"]
            served["k-acme"].append(chunks[-1]["usage"])
            sampled = complete("k-acme", temperature=1.0)
            assert "x-response-cache" not in sampled.headers
            assert metric(http, "pdcluster_router_response_cache_total", 'outcome="hit"') == 2
            assert metric(http, "pdcluster_router_response_cache_total", 'outcome="miss"') == 1
            # The cache is opt in: another tenant's same request is computed.
            assert "x-response-cache" not in complete("k-bursty").headers

            # A tenant past its concurrency gets a 429 that says when to retry.
            long = threading.Thread(target=complete, args=("k-solo",), kwargs={"max_tokens": 150, "ignore_eos": True})
            long.start()
            deadline = time.monotonic() + 60
            while metric(http, "pdcluster_router_inflight_requests") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = complete("k-solo")
            assert (
                _error(refused, 429)["message"].startswith("tenant solo has 1 requests running") and refused.headers["retry-after"] == "1"
            )
            long.join()

            # Fair turns: one long request holds the only slot while bursty's burst queues, then
            # beta's two requests; once the slot frees, the tenants take turns.
            finished: list[str] = []

            def one(key: str, tenant: str, max_tokens: int = 24) -> None:
                assert complete(key, max_tokens=max_tokens, ignore_eos=True).status_code == 200
                finished.append(tenant)  # one request at a time: finishing order is admission order

            def queued_at_least(depth: int) -> None:
                while metric(http, "pdcluster_router_queue_depth") < depth:
                    assert time.monotonic() < deadline, "requests did not queue"
                    time.sleep(0.05)

            deadline = time.monotonic() + 60
            threads = [threading.Thread(target=one, args=("k-solo", "solo", 300))]
            threads[0].start()
            while metric(http, "pdcluster_router_inflight_requests") < 1:
                assert time.monotonic() < deadline, "the long request did not start"
                time.sleep(0.05)
            for key, tenant, count in (("k-bursty", "bursty", 6), ("k-beta", "beta", 2)):
                queued = metric(http, "pdcluster_router_queue_depth")
                threads += [threading.Thread(target=one, args=(key, tenant)) for _ in range(count)]
                for t in threads[-count:]:
                    t.start()
                queued_at_least(queued + count)
            for t in threads:
                t.join()
            # First come would run beta's two last; taking turns, they run second and fourth.
            assert finished == ["solo", "bursty", "beta", "bursty", "beta", "bursty", "bursty", "bursty", "bursty"], finished

            # Tokens per minute: beta's two requests and one more pass 150 tokens; the next is refused until they age out.
            assert complete("k-beta", max_tokens=100, ignore_eos=True).status_code == 200
            over = complete("k-beta")
            assert _error(over, 429)["message"] == "tenant beta used its 150 tokens per minute; retry later"
            assert 1 < int(over.headers["retry-after"]) <= 60

            # Usage: each tenant sees its own, equal to what its responses said; the router's key sees all, with cost.
            mine = http.get("/v1/usage", headers={"authorization": "Bearer k-acme"}).json()
            assert list(mine["tenants"]) == ["acme"]
            acme = mine["tenants"]["acme"]["models"][MODEL]
            told = served["k-acme"]
            assert acme["requests"] == len(told) == 4 and acme["cache_hits"] == 2
            assert acme["prompt_tokens"] == sum(u["prompt_tokens"] for u in told)
            assert acme["completion_tokens"] == sum(u["completion_tokens"] for u in told)
            everyone = http.get("/v1/usage", headers={"authorization": "Bearer admin"}).json()
            assert {"acme", "solo", "bursty", "beta"} <= set(everyone["tenants"]) and everyone["cost_per_hour"] == 10  # 1 P + 1 D
            beta = everyone["tenants"]["beta"]
            assert beta["completion_tokens"] == sum(u["completion_tokens"] for u in served["k-beta"]) and beta["cost_usd"] > 0
            assert beta["usd_per_million_tokens"] == pytest.approx(
                beta["cost_usd"] * 1e6 / (beta["prompt_tokens"] + beta["completion_tokens"]), rel=1e-2
            )
            assert metric(http, "pdcluster_tenant_refusals_total", 'reason="tokens",tenant="beta"') == 1
            assert metric(http, "pdcluster_tenant_requests_total", f'model="{MODEL}",tenant="bursty"') == 7
            assert http.get("/cluster", headers={"authorization": "Bearer k-acme"}).status_code == 401  # a tenant is not the operator

            # `bench serve` mixing two tenants: each one's figures, and its share of the tokens and cost.
            before = http.get("/v1/usage", headers={"authorization": "Bearer admin"}).json()["tenants"]
            workload = Workload(prompt_tokens=40, output_tokens=4, distribution="fixed", seed=5)
            mixed = [BenchTenant("acme", "k-acme", 1.0), BenchTenant("bursty", "k-bursty", 2.0)]
            (result,) = bench_serve(router.record.http, [4.0], 8, workload, quiet=True, cost_per_hour=3.6, tenants=mixed)
            assert result.completed == 8 and set(result.tenants) == {"acme", "bursty"}, result.errors
            after = http.get("/v1/usage", headers={"authorization": "Bearer admin"}).json()["tenants"]
            for name, figures in result.tenants.items():
                assert figures["failed"] == 0 and figures["completed"] == after[name]["requests"] - before[name]["requests"]
                assert figures["completed"] * 4 == after[name]["completion_tokens"] - before[name]["completion_tokens"]
                assert figures["cost_usd"] == pytest.approx(3.6 * result.duration_s / 3600 * figures["share"], rel=1e-2)
            assert sum(t["share"] for t in result.tenants.values()) == pytest.approx(1.0, abs=1e-3)
    finally:
        router.stop()
