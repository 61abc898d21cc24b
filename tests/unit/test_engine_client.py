"""ClusterEngineClient on vLLM's real config, renderer and input processor for the tiny model,
over a fake request flow: vLLM's checks run before anything is routed, n fans out into
seeded samples the way vLLM's ParentRequest does, and outputs come back in the form vLLM's
serving layer asks for (deltas, or one final output)."""

from __future__ import annotations

import asyncio

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import Logprob
from vllm.sampling_params import RequestOutputKind

from pdcluster.common.tiny_model.generate import ensure_tiny_model
from pdcluster.common.vllm_args import vllm_serve_args
from pdcluster.router.config import RouterConfig
from pdcluster.router.engine_client import ClusterEngineClient
from pdcluster.router.generation import TokenDelta
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.worker_pool import WorkerPool


class FakeFlow:
    """Two deltas per sample: the sample's seed as its first token, then a finish."""

    def __init__(self) -> None:
        self.config = RouterConfig(max_n=4)
        self.metrics = RouterMetrics(WorkerPool([]))
        self.requests = []

    async def generate(self, request, usage):
        self.requests.append(request)
        usage.cached_tokens = 16
        usage.prompt_logprobs = [None, {5: Logprob(-1.0)}]
        seed = request.sampling_params.seed
        yield TokenDelta([seed], f"s{seed}")
        await asyncio.sleep(0)
        yield TokenDelta([1], "!", "length")


@pytest.fixture(scope="module")
def engine_parts():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers import renderer_from_config

    args = vllm_serve_args(str(ensure_tiny_model()), ["--max-model-len", "512"], api_key="")
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    return config, renderer_from_config(config)


def run(client, params, prompt=None):
    async def collect():
        engine_input = prompt or {"type": "token", "prompt_token_ids": [5, 6, 7]}
        return [out async for out in client.generate(engine_input, params, "req")]

    return asyncio.run(collect())


def test_n_fans_out_into_seeded_samples_and_deltas_keep_their_index(engine_parts):
    flow = FakeFlow()
    client = ClusterEngineClient(*engine_parts, flow, pool=None)
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
    client = ClusterEngineClient(*engine_parts, FakeFlow(), pool=None)
    (final,) = run(client, SamplingParams(n=2, seed=1, max_tokens=2, output_kind=RequestOutputKind.FINAL_ONLY))
    assert final.finished
    assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in final.outputs] == [
        (0, "s1!", [1, 1], "length"),
        (1, "s2!", [2, 1], "length"),
    ]


def test_vllms_checks_run_before_anything_is_routed(engine_parts):
    flow = FakeFlow()
    client = ClusterEngineClient(*engine_parts, flow, pool=None)
    with pytest.raises(VLLMValidationError, match="maximum context length|max_model_len|longer"):  # past --max-model-len
        run(client, SamplingParams(max_tokens=2), {"type": "token", "prompt_token_ids": [5] * 600})
    with pytest.raises(VLLMValidationError, match="out of vocabulary"):
        run(client, SamplingParams(max_tokens=2), {"type": "token", "prompt_token_ids": [10**9]})
    with pytest.raises(VLLMValidationError, match="n must be at most 4"):
        run(client, SamplingParams(n=5, max_tokens=2))
    assert flow.requests == []
