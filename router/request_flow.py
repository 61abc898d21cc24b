"""One request through the cluster: pick workers, prefill remotely, stream decode tokens.

A decode stream opens first (the decode engine reserves blocks for the prompt and waits
for its KV), then the prefill worker computes the prompt and pushes the KV to it. A failed
prefill or decode worker is excluded and the request tried again elsewhere; a decode
worker lost mid-stream is resumed on another from the prompt plus the tokens already
sent, so the caller sees one uninterrupted stream. Where no other is left, a worker that
answers its health checks again since it failed the request (a partition that ended) is
tried again.

An attempt runs in steps: route it (`_route`), build its messages (`worker_requests`),
reserve the load it puts on its workers (`WorkerLoad`), call the workers (`worker_calls`),
and relay the tokens.

Requests carry vLLM's own SamplingParams (one sample each; the engine client fans n out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from pdcluster.common.engine_profile import load_profile
from pdcluster.common.kv_compatibility import describe_mismatch
from pdcluster.common.prefix_hashes import prompt_block_hashes
from pdcluster.common.sample_wire import decode_logprobs
from pdcluster.common.tracing import CLIENT, SERVER, end_span, ending, start_span, with_trace, worker_rpc_span
from pdcluster.common.worker_record import Role
from pdcluster.protos import worker_pb2
from pdcluster.router import worker_calls
from pdcluster.router.admission import AdmissionGate
from pdcluster.router.config import RouterConfig
from pdcluster.router.continuation_text import ContinuationText
from pdcluster.router.errors import NoCapacity
from pdcluster.router.generation import GenerationRequest, TokenDelta, Usage
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.placement_prediction import PlacementPredictor
from pdcluster.router.routing_policy import PrefillPlacement, PrefixIndex, pick_decode_worker, place_prefill
from pdcluster.router.session_affinity import SessionAffinity
from pdcluster.router.vllm_request_metrics import RequestTimeline
from pdcluster.router.worker_calls import DecodeCall, WorkerFailed
from pdcluster.router.worker_pool import WorkerPool, WorkerView
from pdcluster.router.worker_requests import attempt_params, decode_request, prefill_request

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger("pdcluster.router.flow")


@dataclass
class _Attempt:
    number: int
    # The workers it failed on, each with its `lost` event at the time: the worker's next
    # healthy poll replaces that event, so a worker back since then is told apart.
    excluded: dict = field(default_factory=dict)


@dataclass
class _Route:
    """Where one attempt runs: its decode worker, and where its prompt is computed."""

    decode: WorkerView
    placement: PrefillPlacement
    placed_at: float  # monotonic

    @property
    def prefill(self) -> WorkerView | None:
        return self.placement.worker


class RequestFlow:
    def __init__(self, pool: WorkerPool, config: RouterConfig, metrics: RouterMetrics, tokenizer) -> None:
        self.pool = pool
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        self.prefix_index = PrefixIndex(config.prefix_index_blocks)
        self.sessions = SessionAffinity()
        self.admission = AdmissionGate(config.max_inflight, config.max_queue, metrics)
        profile = load_profile(config.profile) if config.profile else None
        self.predictor = PlacementPredictor(profile, profile, config.slo) if profile else None
        self._incompatible_pairs: set[tuple[str, str]] = set()  # (prefill, decode) worker ids already logged

    async def generate(self, request: GenerationRequest, usage: Usage):
        """Yield the request's TokenDeltas; fills `usage` as it goes. Admission applies."""
        arrived = time.monotonic()
        timeline = self.metrics.vllm.timeline(len(request.prompt_token_ids), arrived) if self.metrics.vllm else None
        span = start_span("router.request", request.trace, SERVER, {"gen_ai.request.id": request.request_id})
        outcome, finish_reason = "error", "error"
        async with self.admission.slot(request.priority, request.tenant, request.tenant_class):
            span.add_event("admitted")
            if timeline:
                timeline.admit()
            try:
                async for delta in self._generate_with_failover(request, usage, arrived, timeline, span):
                    finish_reason = delta.finish_reason or finish_reason
                    yield delta
                outcome = "ok"
            except VLLMValidationError:
                outcome = "invalid"
                raise
            except NoCapacity:
                outcome = "unavailable"
                raise
            except (asyncio.CancelledError, GeneratorExit):
                outcome, finish_reason = "cancelled", "abort"
                raise
            finally:
                span.set_attributes(
                    {
                        "gen_ai.usage.prompt_tokens": usage.prompt_tokens,
                        "gen_ai.usage.completion_tokens": usage.completion_tokens,
                        "gen_ai.usage.cached_tokens": usage.cached_tokens,
                        "pdcluster.outcome": outcome,
                    }
                )
                end_span(span, None if outcome in ("ok", "cancelled") else outcome)
                self.metrics.requests.labels(outcome).inc()
                # As vLLM counts: what an engine ran, whatever its end; not what it refused.
                if timeline and outcome not in ("invalid", "unavailable"):
                    timeline.finish(finish_reason, usage.cached_tokens, request.sampling_params.max_tokens)
        self.metrics.e2e.observe(time.monotonic() - arrived)

    async def _generate_with_failover(
        self, request: GenerationRequest, usage: Usage, arrived: float, timeline: RequestTimeline | None, span: Span
    ):
        usage.prompt_tokens = len(request.prompt_token_ids)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        sent: list[int] = []
        attempt = _Attempt(0)
        last_token_at = None
        logprob_sum = logprob_base = 0.0  # a resumed attempt's cumulative logprob starts at 0 again
        while True:
            try:
                async for delta in self._run_attempt(request, sent, attempt, usage, span):
                    if delta.cumulative_logprob is not None:
                        delta.cumulative_logprob = logprob_sum = logprob_base + delta.cumulative_logprob
                    now = time.monotonic()
                    if delta.token_ids:
                        if last_token_at is None:
                            self.metrics.ttft.observe(now - arrived)
                            span.add_event("first_token")
                        else:
                            self.metrics.itl.observe((now - last_token_at) / len(delta.token_ids))
                        last_token_at = now
                        if timeline:
                            timeline.tokens(len(delta.token_ids), usage.cached_tokens, now)
                    sent.extend(delta.token_ids)
                    usage.completion_tokens = len(sent)
                    self.metrics.output_tokens.inc(len(delta.token_ids))
                    yield delta
                return
            except WorkerFailed as e:
                logprob_base = logprob_sum
                self.pool.mark_unreachable(e.worker)
                attempt.excluded[e.worker] = e.worker.lost
                attempt.number += 1
                if sent:
                    self.metrics.resumes.inc()
                else:
                    self.metrics.retries.labels(e.role).inc()
                logger.warning("request %s: %s; attempt %d, %d tokens sent", request.request_id, e, attempt.number + 1, len(sent))
                if attempt.number >= self.config.max_attempts:
                    raise NoCapacity(f"request failed on {attempt.number} workers; last: {e}") from e

    async def _run_attempt(self, request: GenerationRequest, sent: list[int], attempt: _Attempt, usage: Usage, span: Span):
        prompt = request.prompt_token_ids + sent
        params = attempt_params(request.sampling_params, len(sent))
        if params.max_tokens <= 0:  # the lost worker had sent every token but not the finish
            yield TokenDelta([], "", "length")
            return
        route = await self._route(prompt, params, attempt, request.lora.lora_name if request.lora else None, request)
        attempt_id = f"{request.request_id}-{attempt.number}"
        span.add_event("routed", {"pdcluster.attempt": attempt.number, "pdcluster.placement": route.placement.basis})
        computed_on_decode = 0 if route.prefill else len(prompt)  # queued there until its first token
        reservation = route.decode.load.reserve_decode(params.max_tokens, computed_on_decode)
        decode_span = _rpc_span("Decode", span, route.decode)
        decode = DecodeCall(
            route.decode,
            decode_request(request, attempt_id, prompt, params, route.prefill),
            with_trace(self.pool.metadata, decode_span),
            self.config.decode_idle_timeout_s,
        )
        prefill_task = None
        if route.prefill is not None:
            message = prefill_request(request, attempt_id, prompt, params, route.decode, route.placement)
            prefill_task = self._start_prefill(route.prefill, message, usage, span)
            decode.end_if_fails(prefill_task)
        continuation = _continuation(self.tokenizer, sent, params) if sent else None
        try:
            with ending(decode_span):
                async for chunk in decode.chunks():
                    if reservation.tokens(len(chunk.token_ids), time.monotonic()):
                        self._observe_prediction(route.placement, reservation.stream.first_token_at - route.placed_at)
                        for worker in (route.decode, route.prefill):
                            if worker is not None and not worker.first_token_at:
                                worker.first_token_at = time.time()
                    if prefill_task is not None and not prefill_task.done():
                        # Its reply holds what the first delta reports: prompt logprobs, cached tokens.
                        await asyncio.shield(prefill_task)
                    if route.prefill is None and not sent:
                        usage.cached_tokens = usage.cached_tokens or chunk.num_cached_tokens
                        usage.prompt_logprobs = usage.prompt_logprobs or decode_logprobs(chunk.prompt_logprobs)
                    yield _delta(chunk, continuation, params)
        finally:
            reservation.release()
            decode.close()
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()

    # -- routing ------------------------------------------------------------------------

    async def _route(
        self, prompt: list[int], params: SamplingParams, attempt: _Attempt, lora_name: str | None, request: GenerationRequest
    ) -> _Route:
        # A conversation is its session id, or a chain of Responses: each turn found by the
        # response it continues, and kept under its own response's id for the next.
        asked = request.session_id or request.continues
        last = self.sessions.worker_of(asked)
        decode = pick_decode_worker(await self._decode_candidates(attempt), len(prompt) + params.max_tokens, lora_name, last)
        if asked:
            self.metrics.sessions.labels("new" if not last else "kept" if decode.worker_id == last else "moved").inc()
        self.sessions.ran_on(request.session_id or request.response_id, decode.worker_id)
        placed_at = time.monotonic()
        placement = self._place_prefill(prompt, attempt, decode, lora_name, peer_pull=params.prompt_logprobs is None)
        self._note_pick(decode, Role.DECODE)
        return _Route(decode, placement, placed_at)

    def _candidates(self, role: Role, attempt: _Attempt) -> list[WorkerView]:
        healthy = self.pool.healthy(role)
        untried = [w for w in healthy if w not in attempt.excluded]
        return untried or [w for w in healthy if attempt.excluded.get(w) is not w.lost]

    async def _decode_candidates(self, attempt: _Attempt) -> list[WorkerView]:
        """Healthy decode workers; while there are none (one being replaced), wait a bounded time."""
        deadline = time.monotonic() + self.config.capacity_wait_s
        while not (candidates := self._candidates(Role.DECODE, attempt)):
            if time.monotonic() >= deadline:
                raise NoCapacity(f"no healthy decode worker for {self.config.capacity_wait_s:.0f}s")
            await asyncio.sleep(0.25)
        return candidates

    def _place_prefill(
        self, prompt: list[int], attempt: _Attempt, decode: WorkerView, lora_name: str | None, peer_pull: bool
    ) -> PrefillPlacement:
        hashes: dict[int, list[int]] = {}
        placement = place_prefill(
            self._candidates(Role.PREFILL, attempt),
            decode,
            len(prompt),
            self.prefix_index,
            lambda bs: hashes.setdefault(bs, prompt_block_hashes(prompt, bs, lora_name)),
            self.config,
            self.predictor,
            lora_name,
            peer_pull,
        )
        self._count_incompatible(placement, decode)
        kept = "none" if placement.chosen is None else "kept" if placement.chosen.misses(self.config.slo) == 0 else "missed"
        self.metrics.placements.labels("remote" if placement.worker else "local", placement.basis, kept).inc()
        if placement.worker is None:
            self.metrics.bypass.labels(placement.bypass).inc()
        else:
            self._note_pick(placement.worker, Role.PREFILL)
            self.metrics.prefix_hit_tokens.inc(placement.overlap_tokens)
        if placement.pull is not None:
            self.metrics.peer_pulls.labels(placement.pull.peer.stats.role).inc()
            self.metrics.peer_pull_tokens.inc(placement.pull.tokens - placement.pull.held_tokens)
        return placement

    def _count_incompatible(self, placement: PrefillPlacement, decode: WorkerView) -> None:
        for differs in {differs for _, differs in placement.incompatible}:
            self.metrics.kv_incompatible.labels(differs).inc()
        for prefill, differs in placement.incompatible:
            if (prefill.worker_id, decode.worker_id) not in self._incompatible_pairs:  # once per pair, not per request
                self._incompatible_pairs.add((prefill.worker_id, decode.worker_id))
                ours, theirs = prefill.stats.kv_compatibility, decode.stats.kv_compatibility
                logger.warning(
                    "prefill worker %s cannot hand its KV to decode worker %s (%s): their prompts go elsewhere",
                    prefill.worker_id,
                    decode.worker_id,
                    describe_mismatch(differs, ours, theirs),
                )

    def _observe_prediction(self, placement: PrefillPlacement, observed_s: float) -> None:
        """The first token of a prompt placed by prediction: how far off the prediction was."""
        if placement.chosen is None:
            return
        choice, predicted = placement.chosen.choice, placement.chosen.ttft_s
        self.metrics.ttft_prediction_ratio.labels(choice).observe(observed_s / predicted if predicted > 0 else 0.0)
        self.metrics.ttft_prediction_error.labels(choice).observe(abs(observed_s - predicted))
        self.predictor.observe(choice, predicted, observed_s)

    def _note_pick(self, worker: WorkerView, role: Role) -> None:
        worker.load.picked(time.monotonic())
        worker.first_routed_at = worker.first_routed_at or time.time()
        self.metrics.picks.labels(role, worker.worker_id).inc()

    # -- the prefill call ---------------------------------------------------------------

    def _start_prefill(self, prefill: WorkerView, message: worker_pb2.PrefillRequest, usage: Usage, parent: Span) -> asyncio.Task:
        """Counts the prompt on its prefill worker now, before another request of a burst is
        routed, and uncounts it when the prefill ends, however it ends (even cancelled unstarted)."""
        reservation = prefill.load.reserve_prefill(len(message.prompt_token_ids))
        span = _rpc_span("Prefill", parent, prefill)
        task = asyncio.create_task(self._prefill(prefill, message, usage, with_trace(self.pool.metadata, span)))

        def ended(task: asyncio.Task) -> None:
            reservation.release()
            end_span(span, "cancelled" if task.cancelled() else task.exception())

        task.add_done_callback(ended)
        return task

    async def _prefill(self, prefill: WorkerView, message: worker_pb2.PrefillRequest, usage: Usage, metadata: tuple) -> None:
        reply = await worker_calls.prefill(prefill, message, metadata, self.config.prefill_timeout_s)
        usage.cached_tokens = max(usage.cached_tokens, reply.num_cached_tokens)
        usage.prompt_logprobs = usage.prompt_logprobs or decode_logprobs(reply.prompt_logprobs)


def _rpc_span(method: str, parent: Span, worker: WorkerView) -> Span:
    return worker_rpc_span(method, parent, CLIENT, {"server.address": worker.address, "pdcluster.worker_id": worker.worker_id})


def _delta(chunk: worker_pb2.DecodeChunk, continuation: ContinuationText | None, params: SamplingParams) -> TokenDelta:
    """A chunk of the decode stream as the client's delta (its text decoded here on a resumed attempt)."""
    text = continuation.delta(list(chunk.token_ids), chunk.finish_reason) if continuation else chunk.text
    stop_field = chunk.WhichOneof("stop_reason")
    return TokenDelta(
        list(chunk.token_ids),
        text,
        chunk.finish_reason,
        stop_reason=getattr(chunk, stop_field) if stop_field else None,
        logprobs=decode_logprobs(chunk.logprobs),
        cumulative_logprob=chunk.cumulative_logprob if params.logprobs is not None else None,
    )


def _continuation(tokenizer, sent: list[int], params: SamplingParams) -> ContinuationText:
    stop = [] if params.include_stop_str_in_output else list(params.stop or [])
    return ContinuationText(tokenizer, sent, stop, params.skip_special_tokens)
