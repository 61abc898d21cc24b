"""vLLM's EngineClient, fronting the pools instead of one engine.

vLLM's own OpenAI serving layer runs in the router over it, unchanged: the protocol, request
validation, chat templates, tool and reasoning parsers, structured outputs, logprobs and echo
are vLLM's. Each `generate` call is checked by vLLM's InputProcessor as an engine would check
it, then runs as one disaggregated request per sample (RequestFlow), whose deltas come back as
vLLM RequestOutputs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from vllm.engine.protocol import EngineClient
from vllm.exceptions import VLLMValidationError
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.tasks import SupportedTask
from vllm.utils.async_utils import merge_async_iterators
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.parallel_sampling import ParentRequest

from pdcluster.common.tracing import context_of
from pdcluster.common.worker_record import ROLES
from pdcluster.protos import worker_pb2
from pdcluster.router import worker_calls
from pdcluster.router.caller import Caller, current_caller
from pdcluster.router.config import TenantConfig
from pdcluster.router.errors import Overloaded
from pdcluster.router.generation import GenerationRequest, TokenDelta, Usage
from pdcluster.router.request_flow import RequestFlow
from pdcluster.router.response_cache import CachedSample, ResponseCache, cache_key, cacheable
from pdcluster.router.tenant_usage import TenantUsage, UsageFigures
from pdcluster.router.tenants import Tenants
from pdcluster.router.worker_pool import WorkerPool

SUPPORTED_TASKS: tuple[SupportedTask, ...] = ("generate",)


async def _per_engine(*args, **kwargs):
    raise NotImplementedError("an administrative call on one engine; pdcluster's workers take it one by one, not through the router")


class ClusterEngineClient(EngineClient):
    def __init__(
        self,
        vllm_config,
        renderer,
        flow: RequestFlow,
        pool: WorkerPool,
        tenants: Tenants,
        usage: TenantUsage,
        served_name: str,
        response_cache: ResponseCache | None = None,
        tracing: bool = False,
    ) -> None:
        """`served_name`: the base model's name in usage; `tracing`: the router exports
        OpenTelemetry spans (vLLM's --otlp-traces-endpoint)."""
        self.vllm_config = vllm_config
        self._tracing = tracing
        self.model_config = vllm_config.model_config
        self.renderer = renderer
        self.input_processor = InputProcessor(vllm_config, renderer)
        self._flow = flow
        self._pool = pool
        self._tenants = tenants
        self._usage = usage
        self._served_name = served_name
        self._cache = response_cache

    # -- generation ---------------------------------------------------------------------

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        """Before a response starts (so that a refusal is its status): the tenant's limits, then the router's queue."""
        self._admit(current_caller(), n)
        self._flow.admission.check(n)

    def _admit(self, caller: Caller, n: int) -> None:
        refusal = self._tenants.admission_refusal(caller.tenant, n, time.time())
        if refusal is not None:
            caller.retry_after_s = refusal.retry_after_s
            self._usage.refused(caller.tenant.name, refusal.reason)
            raise Overloaded(refusal.message)

    async def generate(
        self,
        prompt,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        lora_request=None,
        priority: int = 0,
        reasoning_ended: bool | None = None,
        reasoning_parser_kwargs: dict | None = None,
        trace_headers=None,
        session_id: str | None = None,
        **_ignored,  # KV hints and DP ranks do not change what the pools compute
    ) -> AsyncGenerator[RequestOutput, None]:
        if sampling_params.n > self._flow.config.max_n:
            raise VLLMValidationError(f"n must be at most {self._flow.config.max_n}", parameter="n", value=sampling_params.n)
        checked = self.input_processor.process_inputs(
            request_id, prompt, sampling_params, SUPPORTED_TASKS, lora_request=lora_request, priority=priority
        )
        if self._flow.metrics.vllm:
            self._flow.metrics.vllm.request(sampling_params.n)
        prompt_ids = list(checked.prompt_token_ids or ())
        params = sampling_params.clone()
        params.max_tokens = checked.sampling_params.max_tokens
        samples = _samples(checked, request_id, params)
        caller = current_caller()
        tenant = caller.tenant
        model = lora_request.lora_name if lora_request else self._served_name
        self._admit(caller, len(samples))  # again: between the check and here, others may have come
        self._tenants.opened(tenant, len(samples))
        self._tenants.charge(tenant, len(prompt_ids))
        used = UsageFigures(requests=1, prompt_tokens=len(prompt_ids))
        try:
            key = None
            if self._cache is not None and caller.uses_cache and cacheable(params):
                key = cache_key(tenant.name, model, prompt_ids, params)
                if cached := await self._cache.get(key):
                    caller.cache = "hit"
                    self._flow.metrics.response_cache.labels("hit").inc()
                    used.cache_hits, used.cached_tokens = 1, len(prompt_ids)
                    used.completion_tokens = sum(len(c.token_ids) for c in cached)
                    for output in _replayed(request_id, prompt_ids, cached, params.output_kind):
                        yield output
                    return
                caller.cache = "miss"
                self._flow.metrics.response_cache.labels("miss").inc()
            trace = context_of(trace_headers)
            # vLLM runs a response as sub-requests "<response id>_<n>".
            response_id = request_id.rsplit("_", 1)[0] if caller.responses_api else None
            requests = [
                GenerationRequest(
                    sample_id,
                    prompt_ids,
                    p,
                    reasoning_ended,
                    reasoning_parser_kwargs,
                    priority,
                    lora_request,
                    trace,
                    session_id,
                    response_id=response_id,
                    continues=caller.previous_response_id,
                    tenant=tenant.name,
                    tenant_class=tenant.priority,
                )
                for sample_id, p in samples
            ]
            async for output in self._generate(request_id, requests, params.output_kind, tenant, used, key):
                yield output
        finally:
            self._tenants.closed(tenant, len(samples))
            self._usage.record(tenant.name, model, used)

    async def _generate(
        self,
        request_id: str,
        requests: list[GenerationRequest],
        kind: RequestOutputKind,
        tenant: TenantConfig,
        used: UsageFigures,
        key: str | None,
    ):
        """The samples' RequestOutputs as `kind` asks; counts what they used in `used`, and
        stores the whole answer under `key` once every sample finished, before the last output."""
        prompt_ids = requests[0].prompt_token_ids
        usages = [Usage() for _ in requests]
        streams = [self._flow.generate(request, usage) for request, usage in zip(requests, usages, strict=True)]
        outputs = _empty_outputs(len(requests))
        # The outputs hold each sample whole unless they are deltas; then the cache needs its own copy.
        whole = _empty_outputs(len(requests)) if key is not None and kind == RequestOutputKind.DELTA else outputs
        unfinished = len(requests)
        prompt_logprobs_shown = False  # in deltas, once: the first sample to have them brings them
        try:
            async for index, delta in merge_async_iterators(*streams):
                output = outputs[index]
                _accumulate(output, delta, keep=kind != RequestOutputKind.DELTA)
                if whole is not outputs:
                    _accumulate(whole[index], delta, keep=True)
                self._tenants.charge(tenant, len(delta.token_ids))
                unfinished -= bool(delta.finish_reason)
                if key is not None and not unfinished:
                    await self._store(key, whole)
                if kind == RequestOutputKind.FINAL_ONLY and unfinished:
                    continue
                shown = (
                    outputs
                    if kind == RequestOutputKind.FINAL_ONLY
                    else [_as_delta(output, delta) if kind == RequestOutputKind.DELTA else output]
                )
                prompt_logprobs = None if prompt_logprobs_shown else usages[index].prompt_logprobs
                prompt_logprobs_shown |= kind == RequestOutputKind.DELTA and prompt_logprobs is not None
                yield RequestOutput(
                    request_id=request_id,
                    prompt=None,
                    prompt_token_ids=prompt_ids,
                    prompt_logprobs=prompt_logprobs,
                    outputs=shown,
                    finished=not unfinished,
                    num_cached_tokens=max(u.cached_tokens for u in usages),
                )
        finally:
            used.cached_tokens = max(u.cached_tokens for u in usages)
            used.completion_tokens = sum(u.completion_tokens for u in usages)

    async def _store(self, key: str, whole: list[CompletionOutput]) -> None:
        assert self._cache is not None  # a key is made only with a cache
        samples = [CachedSample(list(o.token_ids), o.text, o.finish_reason, o.stop_reason, o.cumulative_logprob) for o in whole]
        await self._cache.put(key, samples)
        self._flow.metrics.response_cache.labels("stored").inc()

    async def abort(self, request_id) -> None:
        """Nothing to do: closing the generate() stream cancels the request on its workers."""

    # -- state --------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return True

    @property
    def is_stopped(self) -> bool:
        return False

    @property
    def errored(self) -> bool:
        return False

    @property
    def dead_error(self) -> BaseException:
        return EngineDeadError()

    async def check_health(self) -> None:
        if not self._pool.ready():  # vLLM's /health answers 503
            raise EngineDeadError("no healthy worker in one of the pools")

    async def get_supported_tasks(self):
        return SUPPORTED_TASKS

    async def is_tracing_enabled(self) -> bool:
        return self._tracing

    async def do_log_stats(self) -> None:
        """The router's figures are its Prometheus metrics."""

    async def is_sleeping(self) -> bool:
        return False

    async def is_paused(self) -> bool:
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        """The router closes its pool itself."""

    # -- one engine's administration: not a cluster's -------------------------------------

    async def encode(self, *args, **kwargs):
        raise VLLMValidationError("pooling models are not served by pdcluster")

    async def add_lora(self, lora_request) -> bool:
        """vLLM's check that an adapter loads (--lora-modules, /v1/load_lora_adapter): every
        worker serving now loads it; a worker that starts later loads it with its first request
        for it (each request carries the adapter's path). A failure carries the worker's word,
        which vLLM's layer turns into its own error."""
        workers = [w for role in ROLES for w in self._pool.healthy(role)]
        await worker_calls.load_lora(
            workers, worker_pb2.LoRAAdapter(name=lora_request.lora_name, path=lora_request.lora_path), self._pool.metadata
        )
        return True

    async def notify_kv_transfer_request_rejected(self, *args, **kwargs) -> None:
        """Our connector's transfers are the router's own; no client-side kv_transfer_params."""

    start_profile = stop_profile = reset_mm_cache = reset_encoder_cache = reset_prefix_cache = _per_engine
    sleep = wake_up = release_kv_cache_memory = pause_generation = resume_generation = _per_engine


def _samples(checked, request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """(id, params) of each sample: n fans out by vLLM's own ParentRequest (seed + index when seeded)."""
    if params.n == 1:
        return [(request_id, params)]
    checked.request_id, checked.external_req_id, checked.sampling_params = request_id, request_id, params
    parent = ParentRequest(checked)
    return [parent.get_child_info(index) for index in range(params.n)]


def _empty_outputs(count: int) -> list[CompletionOutput]:
    return [CompletionOutput(index=i, text="", token_ids=[], cumulative_logprob=None, logprobs=None) for i in range(count)]


def _replayed(request_id: str, prompt_ids: list[int], cached: list[CachedSample], kind: RequestOutputKind):
    """A cached answer as RequestOutputs: each sample whole, in one piece (all at once when `kind` is FINAL_ONLY)."""
    outputs = [
        CompletionOutput(
            index=i,
            text=c.text,
            token_ids=c.token_ids,
            cumulative_logprob=c.cumulative_logprob,
            logprobs=None,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        for i, c in enumerate(cached)
    ]
    groups = [outputs] if kind == RequestOutputKind.FINAL_ONLY else [[o] for o in outputs]
    for number, group in enumerate(groups, 1):
        yield RequestOutput(
            request_id=request_id,
            prompt=None,
            prompt_token_ids=prompt_ids,
            prompt_logprobs=None,
            outputs=group,
            finished=number == len(groups),
            num_cached_tokens=len(prompt_ids),
        )


def _accumulate(output: CompletionOutput, delta: TokenDelta, keep: bool) -> None:
    """The sample's output so far (whole when `keep`, else the latest delta's finish only)."""
    if keep:
        output.text += delta.text
        output.token_ids = [*output.token_ids, *delta.token_ids]
        if delta.logprobs is not None:
            output.logprobs = [*(output.logprobs or []), *delta.logprobs]
    if delta.cumulative_logprob is not None:
        output.cumulative_logprob = delta.cumulative_logprob
    if delta.finish_reason:
        output.finish_reason, output.stop_reason = delta.finish_reason, delta.stop_reason


def _as_delta(output: CompletionOutput, delta: TokenDelta) -> CompletionOutput:
    return CompletionOutput(
        index=output.index,
        text=delta.text,
        token_ids=delta.token_ids,
        cumulative_logprob=output.cumulative_logprob,
        logprobs=delta.logprobs,
        finish_reason=delta.finish_reason or None,
        stop_reason=delta.stop_reason,
    )
