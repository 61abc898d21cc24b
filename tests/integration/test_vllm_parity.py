"""pdcluster against vLLM's own OpenAI server on the same tiny model (float32), both under
the same flags: the same requests get the same answers. Greedy text and token ids are equal,
logprobs equal within 1e-4, structured outputs valid and equal, named tool calls equal, and
bad requests get the same status and error type. Prompts are long enough for the
disaggregated path (remote prefill and a KV transfer) and short enough for the bypass,
streamed and not."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pdcluster.common.tiny_model.generate import CORPUS, ensure_tiny_model

from tests.support.paths import DEPLOY
from tests.support.processes import start_router
from tests.support.prometheus import running_prometheus
from tests.support.router_metrics import metric
from tests.support.vllm_reference import ENGINE_FLAGS, LORA_FLAGS, RUNTIME_LORA_ENV
from tests.support.worker_calls import kv_stats

pytestmark = pytest.mark.slow

BYPASS_BELOW = 32
SHORT = "The old mill"
# JSON valid against SCHEMA with no room for whitespace, which the tiny model would otherwise
# emit until max_tokens.
GRAMMAR = (
    'root ::= "{\\"colour\\":" colour ",\\"size\\":" size "}"\n'
    'colour ::= "\\"red\\"" | "\\"green\\""\n'
    'size ::= "\\"small\\"" | "\\"large\\""'
)
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green"]}, "size": {"enum": ["small", "large"]}},
    "required": ["colour", "size"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def model() -> str:
    return str(ensure_tiny_model())


@pytest.fixture(scope="module")
def servers(vllm_reference, shared_pair, decode_kv_at_start):
    """{"vllm": url, "pdcluster": url}: each serves the model under --model as given, with the
    same engine flags (pdcluster's workers take them) and serving flags (the router hands them
    to vLLM's layer), a chat template of our own among them, LoRA on with two adapters
    (--lora-modules) and vLLM's runtime adapter loading allowed."""
    router_args = ["--bypass-prefill-below", str(BYPASS_BELOW), *ENGINE_FLAGS, *LORA_FLAGS, *vllm_reference.serve_flags]
    router = start_router([w.address for w in shared_pair], router_args, RUNTIME_LORA_ENV)
    try:
        yield {"vllm": vllm_reference.url, "pdcluster": router.record.http}
    finally:
        router.stop()


@pytest.fixture(scope="module")
def decode_kv_at_start(shared_pair):
    """The shared decode worker's KV counters before this module's requests."""
    return kv_stats(shared_pair[1])


@pytest.fixture(scope="module")
def long_prompt(model) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return tokenizer.decode(tokenizer(CORPUS.read_text()).input_ids[:300])


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=300)


def answer(url: str, path: str, body: dict) -> dict:
    """The response, or for a stream the chunks folded into one response's choices."""
    if not body.get("stream"):
        response = post(url, path, body)
        assert response.status_code == 200, response.text
        return response.json()
    choices: dict[int, dict] = {}
    with httpx.stream("POST", url + path, json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line.removeprefix("data: "))["choices"]:
                folded = choices.setdefault(c["index"], {"index": c["index"], "text": "", "token_ids": [], "logprobs": []})
                folded["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
                folded["reasoning"] = folded.get("reasoning", "") + ((c.get("delta") or {}).get("reasoning") or "")
                folded["token_ids"] += c.get("token_ids") or []
                folded["logprobs"] += _positions(c.get("logprobs"))
                folded["finish_reason"] = c.get("finish_reason") or folded.get("finish_reason")
                for call in (c.get("delta") or {}).get("tool_calls") or []:
                    calls = folded.setdefault("tool_calls", [])
                    calls += [{"function": {"name": "", "arguments": ""}} for _ in range(call["index"] + 1 - len(calls))]
                    for key in ("name", "arguments"):
                        calls[call["index"]]["function"][key] += (call.get("function") or {}).get(key) or ""
    return {"choices": [choices[i] for i in sorted(choices)]}


def _positions(logprobs) -> list[tuple]:
    """Per position: (chosen logprob, {token: logprob} of the top ones), for both APIs' shapes."""
    if not logprobs:
        return []
    if "content" in logprobs:  # chat
        return [(p["logprob"], {t["token"]: t["logprob"] for t in p["top_logprobs"]}) for p in logprobs["content"] or []]
    return [
        (lp, top or {}) for lp, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"] or [None] * len(logprobs["token_logprobs"]))
    ]


def assert_logprobs_close(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for (lp_a, top_a), (lp_b, top_b) in zip(a, b):
        assert (lp_a is None) == (lp_b is None)
        if lp_a is not None:
            assert abs(lp_a - lp_b) < 1e-4
        assert top_a.keys() == top_b.keys()
        assert all(abs(top_a[t] - top_b[t]) < 1e-4 for t in top_a)


def both(servers, path: str, body: dict) -> tuple[dict, dict]:
    return answer(servers["vllm"], path, body), answer(servers["pdcluster"], path, body)


def folded(response: dict) -> list[dict]:
    """Choices as comparable values: text, token ids, finish, logprobs per position."""
    out = []
    for c in response["choices"]:
        text = c.get("text") if "text" in c else (c.get("message") or {}).get("content")
        reasoning = c.get("reasoning") or (c.get("message") or {}).get("reasoning") or ""
        logprobs = c["logprobs"] if isinstance(c.get("logprobs"), list) else _positions(c.get("logprobs"))
        out.append(
            {"text": text, "reasoning": reasoning, "token_ids": c.get("token_ids"), "finish": c.get("finish_reason"), "logprobs": logprobs}
        )
    return out


def assert_same(vllm: dict, ours: dict) -> None:
    a, b = folded(vllm), folded(ours)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["text"], x["reasoning"], x["token_ids"], x["finish"]) == (y["text"], y["reasoning"], y["token_ids"], y["finish"])
        assert_logprobs_close(x["logprobs"], y["logprobs"])


def test_responses_api(servers, long_prompt):
    body = {"input": long_prompt, "max_output_tokens": 12, "temperature": 0}
    texts = [
        [part["text"] for item in post(url, "/v1/responses", body).json()["output"] for part in item["content"]] for url in servers.values()
    ]
    assert texts[0] == texts[1] and texts[0][0]


def test_models_are_named_by_model_as_given(servers, model):
    ids = [httpx.get(url + "/v1/models").json()["data"][0]["id"] for url in servers.values()]
    assert ids == [model, model]
    assert all(httpx.get(url + "/version").json()["version"] == "0.32.0" for url in servers.values())


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("which", ["long", "short"])
def test_completions_with_logprobs_stops_and_n(servers, long_prompt, which, stream):
    prompt = long_prompt if which == "long" else SHORT
    bypass_before = metric(httpx.Client(base_url=servers["pdcluster"]), "pdcluster_router_prefill_bypass_total")
    common = {"prompt": prompt, "stream": stream, "return_token_ids": True}
    greedy = {**common, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    cases = [
        greedy,
        {**greedy, "logprobs": 3},
        {**common, "max_tokens": 12, "temperature": 1.0, "seed": 1, "n": 2},  # distinct samples, vLLM's seeds
        {**greedy, "stop_token_ids": [7, 11, 13]},
    ]
    for body in cases:
        assert_same(*both(servers, "/v1/completions", body))
    sampled = both(servers, "/v1/completions", cases[2])[1]["choices"]
    assert sampled[0]["text"] != sampled[1]["text"]
    full = folded(answer(servers["vllm"], "/v1/completions", greedy))[0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert_same(*both(servers, "/v1/completions", {**greedy, "stop": [stop], "ignore_eos": False}))
    bypassed = metric(httpx.Client(base_url=servers["pdcluster"]), "pdcluster_router_prefill_bypass_total") - bypass_before
    assert (bypassed == 0) if which == "long" else (bypassed > 0)


@pytest.mark.parametrize("which", ["long", "short"])
def test_prompt_logprobs_and_echo(servers, long_prompt, which):
    prompt = long_prompt if which == "long" else SHORT
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "prompt_logprobs": 2}
    vllm, ours = both(servers, "/v1/completions", body)
    pa, pb = vllm["choices"][0]["prompt_logprobs"], ours["choices"][0]["prompt_logprobs"]
    assert len(pa) == len(pb) and pa[0] is None and pb[0] is None
    for a, b in zip(pa[1:], pb[1:]):
        assert a.keys() == b.keys() and all(abs(a[t]["logprob"] - b[t]["logprob"]) < 1e-4 for t in a)
    assert_same(*both(servers, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}))


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs(servers, long_prompt, stream):
    common = {"prompt": long_prompt, "max_tokens": 64, "temperature": 0, "stream": stream}
    for constraint in [
        {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}},
        {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
        {"structured_outputs": {"grammar": GRAMMAR}},
        # The tiny model fills JSON with whitespace until max_tokens: equal, and cut alike.
        {"structured_outputs": {"json": SCHEMA}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}},
        {"response_format": {"type": "json_object"}},
    ]:
        vllm, ours = both(servers, "/v1/completions", {**common, **constraint})
        assert_same(vllm, ours)
        text = folded(ours)[0]["text"]
        wanted = constraint.get("structured_outputs", {})
        if "choice" in wanted:
            assert text in ("alpha", "beta", "gamma")
        elif "regex" in wanted:
            assert re.fullmatch("[0-9]{3}-[a-z]{2}", text)
        elif "grammar" in wanted:
            value = json.loads(text)
            assert set(value) == {"colour", "size"} and value["colour"] in ("red", "green")
        else:
            assert text.startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_logprobs_and_a_named_tool(servers, long_prompt, stream):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": long_prompt[:600]}]
    chat = {"messages": messages, "max_tokens": 16, "temperature": 0, "stream": stream, "logprobs": True, "top_logprobs": 2}
    assert_same(*both(servers, "/v1/chat/completions", chat))
    # The assistant's answer continued rather than a new turn started.
    partial = [*messages, {"role": "assistant", "content": "The answer is"}]
    continued = {**chat, "messages": partial, "continue_final_message": True, "add_generation_prompt": False}
    assert_same(*both(servers, "/v1/chat/completions", continued))
    tool = {"messages": messages, "max_tokens": 40, "temperature": 0, "tools": TOOLS, "stream": stream}
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required", "auto"):
        vllm, ours = both(servers, "/v1/chat/completions", {**tool, "tool_choice": choice})
        # The tiny model pads the arguments' JSON with whitespace until max_tokens, so they are
        # compared as text: the same call, cut at the same place.
        assert _tool_calls(vllm) == _tool_calls(ours)
        if isinstance(choice, dict):  # named: always that tool
            assert [name for name, _ in _tool_calls(ours)] == ["get_weather"]
        assert_same(vllm, ours)


def _tool_calls(response: dict) -> list:
    """(name, arguments text) of each tool call of the first choice (a stream's parts joined)."""
    choice = response["choices"][0]
    calls = choice.get("tool_calls") or (choice.get("message") or {}).get("tool_calls") or []
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_usage_reports_cached_prompt_tokens(servers, long_prompt):
    body = {"prompt": long_prompt + " Once more.", "max_tokens": 2}
    post(servers["pdcluster"], "/v1/completions", body)
    usage = post(servers["pdcluster"], "/v1/completions", body).json()["usage"]
    # The prefill worker's prefix cache served the repeated prompt's full blocks.
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_bad_requests_get_vllms_status_and_type_and_disturb_nothing(servers, long_prompt):
    ok = {"prompt": "hello", "max_tokens": 4}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad = [
        ("/v1/completions", {}),
        ("/v1/completions", {**ok, "max_tokens": "five"}),
        ("/v1/completions", {**ok, "prompt": 12}),
        ("/v1/completions", {**ok, "prompt": []}),
        ("/v1/completions", {**ok, "prompt": [10**9]}),
        ("/v1/completions", {**ok, "model": "gpt-9"}),
        ("/v1/completions", {**ok, "prompt": "river " * 5000}),
        ("/v1/completions", {**ok, "max_tokens": 10**6}),
        ("/v1/completions", {**ok, "structured_outputs": {"regex": "("}}),
        ("/v1/completions", {**ok, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}),
        ("/v1/completions", {**ok, "logprobs": 100}),
        ("/v1/chat/completions", {**chat, "messages": []}),
        ("/v1/chat/completions", {**chat, "messages": "hi"}),
        ("/v1/chat/completions", {**chat, "tool_choice": {"type": "function", "function": {"name": "nowhere"}}, "tools": TOOLS}),
    ] + [
        ("/v1/completions", {**ok, field: value})
        for field, value in [
            ("temperature", -1),
            ("top_p", 0),
            ("top_p", 1.5),
            ("max_tokens", 0),
            ("presence_penalty", 5),
            ("top_k", -5),
            ("min_p", 2),
            ("seed", 2**70),
            ("n", 0),
        ]
    ]
    normal = {"prompt": long_prompt, "max_tokens": 16, "temperature": 0}
    before = folded(answer(servers["pdcluster"], "/v1/completions", normal))
    for path, body in bad:
        vllm, ours = (post(url, path, body) for url in servers.values())
        assert ours.status_code == vllm.status_code and ours.status_code >= 400, (body, vllm.text, ours.text)
        assert ours.json()["error"]["type"] == vllm.json()["error"]["type"], (body, vllm.text, ours.text)
    for raw in (b"{not json", b"[1, 2]"):
        vllm, ours = (
            httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"}) for url in servers.values()
        )
        assert (ours.status_code, ours.json()["error"]["type"]) == (vllm.status_code, vllm.json()["error"]["type"])
    # Everything still serves, and a normal request gives the same answer as before.
    pd = servers["pdcluster"]
    assert httpx.get(pd + "/health").status_code == 200
    assert all(w["healthy"] for w in httpx.get(pd + "/cluster").json()["workers"])
    assert folded(answer(pd, "/v1/completions", normal)) == before


def test_tokenize_and_detokenize(servers, long_prompt):
    for body in ({"prompt": long_prompt}, {"messages": [{"role": "user", "content": "The river"}], "add_generation_prompt": True}):
        vllm, ours = (post(url, "/tokenize", body) for url in servers.values())
        assert ours.status_code == vllm.status_code == 200 and ours.json() == vllm.json()
    tokens = post(servers["vllm"], "/tokenize", {"prompt": long_prompt}).json()["tokens"]
    vllm, ours = (post(url, "/detokenize", {"tokens": tokens}) for url in servers.values())
    assert ours.status_code == vllm.status_code == 200 and ours.json() == vllm.json()


def test_the_disaggregated_answers_above_were_decoded_from_transferred_kv(servers, shared_pair, decode_kv_at_start):
    """Parity alone would hold if every KV load failed and the decode worker recomputed the
    prompt: the decode worker received the transfers and recomputed none."""
    before, now = decode_kv_at_start, kv_stats(shared_pair[1])
    assert now.transfers_received - before.transfers_received > 10
    assert now.recomputes == before.recomputes and now.transfers_failed == before.transfers_failed


# What vLLM's Grafana dashboard (examples/observability/prometheus_grafana/grafana.json in vLLM's
# repository) reads, by how it reads it, and the engine figures the drop-in promise names.
DASHBOARD_HISTOGRAMS = (
    "vllm:e2e_request_latency_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:time_to_first_token_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_max_num_generation_tokens",
)
DASHBOARD_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total")
ENGINE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
ENGINE_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total")


def _vllm_series_names(metrics_text: str) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name.startswith("vllm:") and not sample.name.endswith("_created")
    }


def test_vllms_dashboard_reads_the_cluster_through_the_shipped_prometheus_config(servers, model, long_prompt, tmp_path):
    """Prometheus, on the shipped config (its addresses pointed at this cluster), finds the
    workers through the router's service discovery; every query of vLLM's dashboard then has
    data, under the served model's name, and every `vllm:` series vLLM's own server exports
    exists for the cluster. Request figures come from the router only (a prefill worker's own
    first token is not a request's); engine figures from both pools' workers."""
    url = servers["pdcluster"]
    config = yaml.safe_load((DEPLOY / "observability" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["pdcluster-router"]["static_configs"] = [{"targets": [url.removeprefix("http://")]}]
    (discovery,) = jobs["pdcluster-workers"]["http_sd_configs"]
    discovery.update(url=url + "/prometheus/targets", refresh_interval="1s")
    del jobs["pdcluster-controller"]  # no controller: workers and a router started by hand
    config["scrape_configs"] = list(jobs.values())
    with running_prometheus(config, tmp_path) as prometheus:
        targets = prometheus.wait_for_targets(3)
        assert sorted(t["discoveredLabels"].get("__meta_pdcluster_role", "") for t in targets) == ["", "decode", "prefill"]
        for prompt, stream in ((long_prompt, False), (long_prompt[: len(long_prompt) // 2], True), (SHORT, True)):
            answer(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream})
        time.sleep(3)  # two scrapes after the last request
        selector = f'{{model_name="{model}"}}'
        for name in DASHBOARD_HISTOGRAMS:
            assert prometheus.query(f"sum by (le) (increase({name}_bucket{selector}[1m])) > 0"), name
            assert prometheus.query(f"{name}_sum{selector}") and prometheus.query(f"{name}_count{selector}"), name
        for name in DASHBOARD_COUNTERS:
            assert prometheus.query(f"sum(increase({name}{selector}[1m])) > 0"), name
        reasons = {r["metric"]["finished_reason"] for r in prometheus.query(f"increase(vllm:request_success_total{selector}[1m]) > 0")}
        assert "length" in reasons
        for name in ENGINE_GAUGES + ENGINE_COUNTERS:
            roles = {r["metric"].get("role") for r in prometheus.query(f"{name}{selector}")}
            assert roles == {"prefill", "decode"}, (name, roles)
        # Each request's first token is counted once, by the router: no worker exports TTFT.
        assert not prometheus.query('vllm:time_to_first_token_seconds_count{role!=""}')
        (ttft,) = prometheus.query(f"sum(vllm:time_to_first_token_seconds_count{selector})")
        router_ttft = metric(httpx.Client(base_url=url), "pdcluster_router_ttft_seconds_count")
        assert float(ttft["value"][1]) == router_ttft > 0
        # Every vllm: series vLLM's own server exports exists for the cluster.
        reference = _vllm_series_names(httpx.get(servers["vllm"] + "/metrics").text)
        ours = {r["metric"]["__name__"] for r in prometheus.query('count by (__name__) ({__name__=~"vllm:.+"})')}
        assert {"vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket"} <= reference
        assert reference - ours == set()


# -- LoRA adapters: the same flags, endpoints, answers and errors as vLLM's ---------------


def _models(url: str) -> list[tuple]:
    return sorted((m["id"], m["root"], m["parent"]) for m in httpx.get(url + "/v1/models").json()["data"])


def test_lora_adapters_are_listed_and_loaded_on_both_pools(servers, vllm_reference):
    assert _models(servers["pdcluster"]) == _models(servers["vllm"])
    assert {m[0] for m in _models(servers["vllm"])} >= set(vllm_reference.adapters)
    # --lora-modules loaded each adapter on every worker, prefill and decode alike (as the
    # router's next health checks report).
    deadline = time.monotonic() + 30
    while True:
        workers = httpx.get(servers["pdcluster"] + "/cluster").json()["workers"]
        held = {w["role"]: set(w["lora_adapters"]) for w in workers}
        if held == {"prefill": set(vllm_reference.adapters), "decode": set(vllm_reference.adapters)} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert held == {"prefill": set(vllm_reference.adapters), "decode": set(vllm_reference.adapters)}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("which", ["long", "short"])
def test_lora_greedy_text_and_logprobs_equal_vllms(servers, vllm_reference, long_prompt, which, stream):
    """Long prompts are prefilled on the prefill worker under the adapter and decoded under it
    on the decode worker (the KV is the adapter's); short ones run on the decode worker alone."""
    prompt = long_prompt if which == "long" else SHORT
    base = {
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 2,
        "stream": stream,
        "return_token_ids": True,
    }
    texts = [folded(answer(servers["vllm"], "/v1/completions", base))[0]["text"]]
    for adapter in vllm_reference.adapters:
        vllm, ours = both(servers, "/v1/completions", {**base, "model": adapter})
        assert_same(vllm, ours)
        texts.append(folded(ours)[0]["text"])
    assert len(set(texts)) == 3  # each adapter changes the answer: it really ran


def test_lora_prompts_never_share_kv_blocks_across_adapters(servers, vllm_reference, model):
    """The same prompt under the base model, then adapter a, then b, then a again: only the
    repeat finds cached blocks, as in vLLM (prefix hashes and routing include the adapter)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(CORPUS.read_text()).input_ids
    prompt = tokenizer.decode(ids[350:] + ids[:100])  # several blocks no other test sent
    a, b = vllm_reference.adapters
    cached = {}
    for url_name, url in servers.items():
        cached[url_name] = [
            answer(url, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0, "model": model})["usage"][
                "prompt_tokens_details"
            ]["cached_tokens"]
            for model in (servers_model(url), a, b, a)
        ]
    assert cached["pdcluster"] == cached["vllm"]
    assert cached["vllm"][:3] == [0, 0, 0] and cached["vllm"][3] > 0


def servers_model(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def test_lora_adapters_load_and_unload_at_runtime_as_in_vllm(servers, vllm_reference, long_prompt):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING):
    the same answers, errors included; a loaded adapter serves on both pools."""
    path = vllm_reference.adapters["tiny-lora-b"]
    body = {"prompt": long_prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "model": "tiny-lora-c"}

    def each(path_: str, payload: dict) -> list[tuple[int, object]]:
        replies = [post(url, path_, payload) for url in servers.values()]
        return [(r.status_code, _error_kind(r)) for r in replies]

    [(vllm_status, vllm_kind), ours] = each("/v1/completions", body)
    assert vllm_status == 404 and ours == (vllm_status, vllm_kind)  # unknown adapter: vLLM's error
    [vllm, ours] = each("/v1/load_lora_adapter", {"lora_name": "tiny-lora-c", "lora_path": "/nonexistent/adapter"})
    assert vllm[0] >= 400 and ours == vllm  # a path no engine can load
    [vllm, ours] = each("/v1/load_lora_adapter", {"lora_name": "tiny-lora-c", "lora_path": path})
    assert vllm == ours == (200, None)
    assert_same(*both(servers, "/v1/completions", body))
    assert_same(*both(servers, "/v1/completions", {**body, "stream": True}))
    [vllm, ours] = each("/v1/unload_lora_adapter", {"lora_name": "tiny-lora-c"})
    assert vllm == ours == (200, None)
    assert each("/v1/completions", body) == [(404, vllm_kind)] * 2


def _error_kind(response: httpx.Response):
    """An error's OpenAI type, None for a success."""
    if response.status_code == 200:
        return None
    return response.json()["error"]["type"]
