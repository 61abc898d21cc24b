"""ClusterEngineClient on vLLM's real config, renderer and input processor for the tiny model,
over a fake request flow: vLLM's checks run before anything is routed, n fans out into
seeded samples the way vLLM's ParentRequest does, and outputs come back in the form vLLM's
serving layer asks for (deltas, or one final output)."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from prometheus_client import CollectorRegistry
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import Logprob
from vllm.sampling_params import RequestOutputKind

from pdcluster.common.tiny_model.generate import ensure_tiny_model
from pdcluster.common.vllm_args import vllm_serve_args
from pdcluster.router.admission import AdmissionGate
from pdcluster.router.caller import Caller, current_caller, set_caller
from pdcluster.router.config import RouterConfig, TenantConfig
from pdcluster.router.engine_client import ClusterEngineClient
from pdcluster.router.errors import Overloaded
from pdcluster.router.generation import TokenDelta
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.response_cache import ResponseCache
from pdcluster.router.tenant_usage import TenantUsage
from pdcluster.router.tenants import Tenants
from pdcluster.router.worker_pool import WorkerPool


class FakeFlow:
    """Two deltas per sample: the sample's seed as its first token, then a finish."""

    def __init__(self) -> None:
        self.config = RouterConfig(max_n=4)
        self.metrics = RouterMetrics(WorkerPool([]))
        self.admission = AdmissionGate(8, 8, self.metrics)
        self.requests = []

    async def generate(self, request, usage):
        self.requests.append(request)
        usage.cached_tokens = 16
        usage.prompt_logprobs = [None, {5: Logprob(-1.0)}]
        seed = request.sampling_params.seed or 0
        yield TokenDelta([seed], f"s{seed}")
        await asyncio.sleep(0)
        yield TokenDelta([1], "!", "length")


@pytest.fixture(scope="module")
def engine_parts():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers import renderer_from_config

    args = vllm_serve_args(str(ensure_tiny_model()), ["--max-model-len", "512"])
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    return config, renderer_from_config(config)


def client_over(engine_parts, flow, tenants: Tenants | None = None, cache: ResponseCache | None = None) -> ClusterEngineClient:
    usage = TenantUsage(CollectorRegistry(), cost_per_hour=lambda: 0.0)
    return ClusterEngineClient(*engine_parts, flow, None, tenants or Tenants([]), usage, "tiny", cache)


TOKENS = {"type": "token", "prompt_token_ids": [5, 6, 7]}


def run(client, params, prompt=None):
    async def collect():
        engine_input = prompt or TOKENS
        return [out async for out in client.generate(engine_input, params, "req")]

    return asyncio.run(collect())


def test_n_fans_out_into_seeded_samples_and_deltas_keep_their_index(engine_parts):
    flow = FakeFlow()
    client = client_over(engine_parts, flow)
    outputs = run(client, SamplingParams(n=3, seed=10, max_tokens=2, output_kind=RequestOutputKind.DELTA))
    assert [r.request_id for r in flow.requests] == ["0_req", "1_req", "2_req"]
    assert [r.sampling_params.seed for r in flow.requests] == [10, 11, 12]  # vLLM's seed + index
    assert all(r.sampling_params.n == 1 and r.prompt_token_ids == [5, 6, 7] for r in flow.requests)
    texts = {}
    for out in outputs:
        (choice,) = out.outputs
        texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: "s10!", 1: "s11!", 2: "s12!"}
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert outputs[0].num_cached_tokens == 16 and outputs[0].prompt_token_ids == [5, 6, 7]
    assert [o.prompt_logprobs is not None for o in outputs].count(True) == 1  # one delta brings them


def test_final_only_is_one_output_with_every_sample_whole(engine_parts):
    client = client_over(engine_parts, FakeFlow())
    (final,) = run(client, SamplingParams(n=2, seed=1, max_tokens=2, output_kind=RequestOutputKind.FINAL_ONLY))
    assert final.finished
    assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in final.outputs] == [
        (0, "s1!", [1, 1], "length"),
        (1, "s2!", [2, 1], "length"),
    ]


def test_vllms_checks_run_before_anything_is_routed(engine_parts):
    flow = FakeFlow()
    client = client_over(engine_parts, flow)
    with pytest.raises(VLLMValidationError, match="maximum context length|max_model_len|longer"):  # past --max-model-len
        run(client, SamplingParams(max_tokens=2), {"type": "token", "prompt_token_ids": [5] * 600})
    with pytest.raises(VLLMValidationError, match="out of vocabulary"):
        run(client, SamplingParams(max_tokens=2), {"type": "token", "prompt_token_ids": [10**9]})
    with pytest.raises(VLLMValidationError, match="n must be at most 4"):
        run(client, SamplingParams(n=5, max_tokens=2))
    assert flow.requests == []


def test_a_repeat_of_a_deterministic_request_is_answered_from_the_cache(engine_parts, redis_url):
    flow = FakeFlow()
    tenant = TenantConfig(name="acme", api_keys=["k"], response_cache=True)
    kinds = (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE)

    async def requests():
        cache = ResponseCache(redis_url, ttl_s=60, cluster_name=secrets.token_hex(4))
        client = client_over(engine_parts, flow, Tenants([tenant]), cache)
        set_caller(Caller(tenant))
        try:
            answers = {}
            for kind in kinds:  # seeded (n=2): deterministic, the same answer however it is delivered
                answers[kind] = [
                    out async for out in client.generate(TOKENS, SamplingParams(n=2, seed=3, max_tokens=2, output_kind=kind), "r")
                ]
            sampled = [out async for out in client.generate(TOKENS, SamplingParams(n=1, temperature=1.0, max_tokens=2), "s")]
            sampled_again = [out async for out in client.generate(TOKENS, SamplingParams(n=1, temperature=1.0, max_tokens=2), "s")]
            return answers, sampled, sampled_again, current_caller().cache
        finally:
            await cache.close()

    answers, sampled, sampled_again, last_cache_word = asyncio.run(requests())
    # Computed once (2 samples), then twice from the cache; each sampled request computed.
    assert [r.request_id for r in flow.requests] == ["0_r", "1_r", "s", "s"]
    (final,) = answers[RequestOutputKind.FINAL_ONLY]
    texts = {o.index: (o.text, list(o.token_ids), o.finish_reason) for o in final.outputs}
    assert texts == {0: ("s3!", [3, 1], "length"), 1: ("s4!", [4, 1], "length")}
    for kind in kinds[1:]:
        replayed = answers[kind]
        assert {
            o.outputs[0].index: (o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in replayed
        } == texts
        assert replayed[-1].finished and all(o.num_cached_tokens == 3 for o in replayed)  # usage: the whole prompt cached
    metrics = {s.labels["outcome"]: s.value for m in flow.metrics.response_cache.collect() for s in m.samples if s.name.endswith("_total")}
    assert metrics == {"miss": 1.0, "stored": 1.0, "hit": 2.0}  # a sampled request is never asked
    assert last_cache_word == "hit" and sampled[-1].finished and sampled_again[-1].finished


def test_a_tenant_over_its_concurrency_is_refused_with_when_to_retry(engine_parts):
    tenant = TenantConfig(name="small", api_keys=["k"], max_concurrent=2)
    client = client_over(engine_parts, FakeFlow(), Tenants([tenant]))
    set_caller(Caller(tenant))
    client.check_admission(2)
    with pytest.raises(Overloaded, match="tenant small .* its limit is 2"):
        client.check_admission(3)
    assert current_caller().retry_after_s == 1
