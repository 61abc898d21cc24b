"""One request through the cluster: pick workers, prefill remotely, stream decode tokens.

A decode stream opens first (the decode engine reserves blocks for the prompt and waits
for its KV), then the prefill worker computes the prompt and pushes the KV to it. A failed
prefill or decode worker is excluded and the request tried again elsewhere; a decode
worker lost mid-stream is resumed on another from the prompt plus the tokens already
sent, so the caller sees one uninterrupted stream.

Requests carry vLLM's own SamplingParams (one sample each; the engine client fans n out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
import msgspec
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from pdcluster.common.engine_profile import load_profile
from pdcluster.common.prefix_hashes import prompt_block_hashes
from pdcluster.common.sample_wire import decode_logprobs, encode_sampling_params
from pdcluster.common.worker_record import Role
from pdcluster.protos import worker_pb2
from pdcluster.router.admission import AdmissionGate
from pdcluster.router.config import RouterConfig
from pdcluster.router.continuation_text import ContinuationText
from pdcluster.router.errors import NoCapacity
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.placement_prediction import PlacementPredictor
from pdcluster.router.routing_policy import PrefillPlacement, PrefixIndex, pick_decode_worker, place_prefill
from pdcluster.router.worker_pool import DecodeStream, WorkerPool, WorkerView

logger = logging.getLogger("pdcluster.router.flow")

LOST = "lost: it stopped answering health checks"
# Codes that say the request itself is wrong: retrying elsewhere would fail the same way.
_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # n == 1; max_tokens is always set
    reasoning_ended: bool | None = None  # vLLM's OpenAI layer's word on the reasoning parser's state
    reasoning_parser_kwargs: dict | None = None


@dataclass
class TokenDelta:
    token_ids: list[int]
    text: str
    finish_reason: str = ""
    stop_reason: int | str | None = None
    logprobs: list | None = None  # vLLM's, one position per token, when asked for
    cumulative_logprob: float | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list | None = None  # vLLM's, when asked for; known before the first delta


@dataclass
class _Attempt:
    number: int
    excluded: set = field(default_factory=set)


class WorkerFailed(Exception):
    def __init__(self, worker: WorkerView, role: str, reason: str) -> None:
        super().__init__(f"{role} worker {worker.address}: {reason}")
        self.worker, self.role = worker, role


class RequestFlow:
    def __init__(self, pool: WorkerPool, config: RouterConfig, metrics: RouterMetrics, tokenizer) -> None:
        self.pool = pool
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        self.prefix_index = PrefixIndex(config.prefix_index_blocks)
        self.admission = AdmissionGate(config.max_inflight, config.max_queue, metrics)
        profile = load_profile(config.profile) if config.profile else None
        self.predictor = PlacementPredictor(profile, profile, config.slo) if profile else None

    async def generate(self, request: GenerationRequest, usage: Usage):
        """Yield the request's TokenDeltas; fills `usage` as it goes. Admission applies."""
        arrived = time.monotonic()
        outcome = "error"
        async with self.admission.slot():
            try:
                async for delta in self._generate_with_failover(request, usage, arrived):
                    yield delta
                outcome = "ok"
            except VLLMValidationError:
                outcome = "invalid"
                raise
            except NoCapacity:
                outcome = "unavailable"
                raise
            except (asyncio.CancelledError, GeneratorExit):
                outcome = "cancelled"
                raise
            finally:
                self.metrics.requests.labels(outcome).inc()
        self.metrics.e2e.observe(time.monotonic() - arrived)

    async def _generate_with_failover(self, request: GenerationRequest, usage: Usage, arrived: float):
        usage.prompt_tokens = len(request.prompt_token_ids)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        sent: list[int] = []
        attempt = _Attempt(0)
        last_token_at = None
        logprob_sum = logprob_base = 0.0  # a resumed attempt's cumulative logprob starts at 0 again
        while True:
            try:
                async for delta in self._run_attempt(request, sent, attempt, usage):
                    if delta.cumulative_logprob is not None:
                        delta.cumulative_logprob = logprob_sum = logprob_base + delta.cumulative_logprob
                    now = time.monotonic()
                    if delta.token_ids:
                        if last_token_at is None:
                            self.metrics.ttft.observe(now - arrived)
                        else:
                            self.metrics.itl.observe((now - last_token_at) / len(delta.token_ids))
                        last_token_at = now
                    sent.extend(delta.token_ids)
                    usage.completion_tokens = len(sent)
                    self.metrics.output_tokens.inc(len(delta.token_ids))
                    yield delta
                return
            except WorkerFailed as e:
                logprob_base = logprob_sum
                self.pool.mark_unreachable(e.worker)
                attempt.excluded.add(e.worker)
                attempt.number += 1
                if sent:
                    self.metrics.resumes.inc()
                else:
                    self.metrics.retries.labels(e.role).inc()
                logger.warning("request %s: %s; attempt %d, %d tokens sent", request.request_id, e, attempt.number + 1, len(sent))
                if attempt.number >= self.config.max_attempts:
                    raise NoCapacity(f"request failed on {attempt.number} workers; last: {e}") from e

    async def _run_attempt(self, request: GenerationRequest, sent: list[int], attempt: _Attempt, usage: Usage):
        prompt = request.prompt_token_ids + sent
        params = _attempt_params(request.sampling_params, len(sent))
        if params.max_tokens <= 0:  # the lost worker had sent every token but not the finish
            yield TokenDelta([], "", "length")
            return
        decode = pick_decode_worker(await self._decode_candidates(attempt), len(prompt) + params.max_tokens)
        placed_at = time.monotonic()
        placement = self._place_prefill(prompt, attempt, decode)
        prefill = placement.worker
        self._note_pick(decode, Role.DECODE)
        transfer_id = f"{request.request_id}-{attempt.number}" if prefill else None
        encoded_params = decode_params = encode_sampling_params(params)
        if prefill is not None and params.prompt_logprobs is not None:
            without = params.clone()  # the prefill worker computes the prompt, and its logprobs
            without.prompt_logprobs = None
            decode_params = encode_sampling_params(without)
        decode_request = worker_pb2.DecodeRequest(
            request_id=f"{request.request_id}-{attempt.number}",
            prompt_token_ids=prompt,
            sampling_params=decode_params,
            transfer_id=transfer_id,
            producer_kv_endpoint=prefill.stats.kv_endpoint if prefill else "",
            reasoning_ended=request.reasoning_ended,
            reasoning_parser_kwargs=msgspec.msgpack.encode(request.reasoning_parser_kwargs) if request.reasoning_parser_kwargs else b"",
        )
        continuation = _continuation(self.tokenizer, sent, params) if sent else None
        progress = DecodeStream(params.max_tokens)
        local_prompt = 0 if prefill else len(prompt)  # computed on the decode worker: queued there until its first token
        decode.inflight += 1
        decode.streams.add(progress)
        decode.pending_prefill_tokens += local_prompt
        stream = decode.stub.Decode(decode_request, metadata=self.pool.metadata)
        decode_watch = _cancel_when_lost(decode, stream)
        prefill_task = None
        if prefill is not None:
            prefill_task = self._start_prefill(prefill, decode, prompt, encoded_params, transfer_id, usage)
            # A failed prefill must not leave decode waiting for KV that will not come.
            prefill_task.add_done_callback(lambda task: _failure_of(task) and stream.cancel())
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.read(), self.config.decode_idle_timeout_s)
                except TimeoutError:
                    raise WorkerFailed(decode, Role.DECODE, f"no token for {self.config.decode_idle_timeout_s:.0f}s") from None
                except asyncio.CancelledError:
                    # grpc.aio reports our own stream.cancel() (the decode worker lost, or a failed
                    # prefill) this way.
                    if asyncio.current_task().cancelling():
                        raise
                    if _fired(decode_watch):
                        raise WorkerFailed(decode, Role.DECODE, LOST) from None
                    if _failure_of(prefill_task) is None:
                        raise
                    raise _failure_of(prefill_task) from None
                except grpc.aio.AioRpcError as e:
                    raise _failure_of(prefill_task) or _classify(e, decode, Role.DECODE) from None
                if chunk is grpc.aio.EOF:
                    return
                if progress.first_token_at is None and chunk.token_ids:
                    progress.first_token_at = time.monotonic()
                    decode.pending_prefill_tokens -= local_prompt
                    local_prompt = 0
                    self._observe_prediction(placement, progress.first_token_at - placed_at)
                progress.tokens += len(chunk.token_ids)
                if prefill_task is not None and not prefill_task.done():
                    # Its reply holds what the first delta reports: prompt logprobs, cached tokens.
                    await asyncio.shield(prefill_task)
                if prefill is None and not sent:
                    usage.cached_tokens = usage.cached_tokens or chunk.num_cached_tokens
                    usage.prompt_logprobs = usage.prompt_logprobs or decode_logprobs(chunk.prompt_logprobs)
                text = continuation.delta(list(chunk.token_ids), chunk.finish_reason) if continuation else chunk.text
                stop_field = chunk.WhichOneof("stop_reason")
                yield TokenDelta(
                    list(chunk.token_ids),
                    text,
                    chunk.finish_reason,
                    stop_reason=getattr(chunk, stop_field) if stop_field else None,
                    logprobs=decode_logprobs(chunk.logprobs),
                    cumulative_logprob=chunk.cumulative_logprob if params.logprobs is not None else None,
                )
        finally:
            decode_watch.cancel()
            decode.inflight -= 1
            decode.streams.discard(progress)
            decode.pending_prefill_tokens -= local_prompt
            stream.cancel()  # no-op once finished; aborts the request on the worker otherwise
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()

    def _candidates(self, role: str, attempt: _Attempt) -> list[WorkerView]:
        return [w for w in self.pool.healthy(role) if w not in attempt.excluded]

    async def _decode_candidates(self, attempt: _Attempt) -> list[WorkerView]:
        """Healthy decode workers; while there are none (one being replaced), wait a bounded time."""
        deadline = time.monotonic() + self.config.capacity_wait_s
        while not (candidates := self._candidates(Role.DECODE, attempt)):
            if time.monotonic() >= deadline:
                raise NoCapacity(f"no healthy decode worker for {self.config.capacity_wait_s:.0f}s")
            await asyncio.sleep(0.25)
        return candidates

    def _place_prefill(self, prompt: list[int], attempt: _Attempt, decode: WorkerView) -> PrefillPlacement:
        hashes: dict[int, list[int]] = {}
        placement = place_prefill(
            self._candidates(Role.PREFILL, attempt),
            decode,
            len(prompt),
            self.prefix_index,
            lambda bs: hashes.setdefault(bs, prompt_block_hashes(prompt, bs)),
            self.config,
            self.predictor,
        )
        kept = "none" if placement.chosen is None else "kept" if placement.chosen.misses(self.config.slo) == 0 else "missed"
        self.metrics.placements.labels("remote" if placement.worker else "local", placement.basis, kept).inc()
        if placement.worker is None:
            self.metrics.bypass.labels(placement.bypass).inc()
        else:
            self._note_pick(placement.worker, Role.PREFILL)
            self.metrics.prefix_hit_tokens.inc(placement.overlap_tokens)
        return placement

    def _observe_prediction(self, placement: PrefillPlacement, observed_s: float) -> None:
        """The first token of a prompt placed by prediction: how far off the prediction was."""
        if placement.chosen is None:
            return
        choice, predicted = placement.chosen.choice, placement.chosen.ttft_s
        self.metrics.ttft_prediction_ratio.labels(choice).observe(observed_s / predicted if predicted > 0 else 0.0)
        self.metrics.ttft_prediction_error.labels(choice).observe(abs(observed_s - predicted))
        self.predictor.observe(choice, predicted, observed_s)

    def _note_pick(self, worker: WorkerView, role: Role) -> None:
        worker.last_picked = time.monotonic()
        self.metrics.picks.labels(role, worker.worker_id).inc()

    def _start_prefill(
        self, prefill: WorkerView, decode: WorkerView, prompt: list[int], sampling_params: bytes, transfer_id: str, usage: Usage
    ) -> asyncio.Task:
        """Counts the prompt on its prefill worker now, before another request of a burst is
        routed, and uncounts it when the prefill ends, however it ends (even cancelled unstarted)."""
        num_tokens = len(prompt)
        prefill.pending_prefill_tokens += num_tokens
        prefill.inflight += 1

        def uncount(_task: asyncio.Task) -> None:
            prefill.pending_prefill_tokens -= num_tokens
            prefill.inflight -= 1

        task = asyncio.create_task(self._prefill(prefill, decode, prompt, sampling_params, transfer_id, usage))
        task.add_done_callback(uncount)
        return task

    async def _prefill(
        self, prefill: WorkerView, decode: WorkerView, prompt: list[int], sampling_params: bytes, transfer_id: str, usage: Usage
    ) -> None:
        call = prefill.stub.Prefill(
            worker_pb2.PrefillRequest(
                request_id=transfer_id,
                prompt_token_ids=prompt,
                sampling_params=sampling_params,
                target=worker_pb2.KVTransferTarget(transfer_id=transfer_id, consumer_endpoint=decode.stats.kv_endpoint),
            ),
            timeout=self.config.prefill_timeout_s,
            metadata=self.pool.metadata,
        )
        watch = _cancel_when_lost(prefill, call)
        try:
            reply = await call
        except asyncio.CancelledError:
            if _fired(watch) and not asyncio.current_task().cancelling():
                raise WorkerFailed(prefill, Role.PREFILL, LOST) from None
            raise
        except grpc.aio.AioRpcError as e:
            raise _classify(e, prefill, Role.PREFILL) from None
        finally:
            watch.cancel()
            call.cancel()  # no-op once answered; aborts the prefill on the worker otherwise
        usage.cached_tokens = max(usage.cached_tokens, reply.num_cached_tokens)
        usage.prompt_logprobs = usage.prompt_logprobs or decode_logprobs(reply.prompt_logprobs)


def _cancel_when_lost(worker: WorkerView, call) -> asyncio.Task:
    """A watcher that cancels `call`, an RPC on `worker`, as soon as the pool finds the worker
    lost (gone or frozen); the RPC then ends at once here, and the worker drops the request if
    it ever wakes up. Cancel the watcher once done with the call."""
    watch = asyncio.ensure_future(worker.lost.wait())
    watch.add_done_callback(lambda w: w.cancelled() or call.cancel())
    return watch


def _fired(watch: asyncio.Task) -> bool:
    return watch.done() and not watch.cancelled()


def _failure_of(task: asyncio.Task | None) -> BaseException | None:
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()


def _classify(error: grpc.aio.AioRpcError, worker: WorkerView, role: str) -> Exception:
    if error.code() in _CLIENT_ERRORS:
        return VLLMValidationError(error.details() or "invalid request")
    return WorkerFailed(worker, role, f"{error.code().name}: {error.details()}")


def _attempt_params(params: SamplingParams, num_sent: int) -> SamplingParams:
    """The request's params for an attempt that continues after `num_sent` tokens."""
    if not num_sent:
        return params
    if params.structured_outputs is not None:
        # vLLM cannot start a grammar part-way through an output: fail rather than break it.
        raise NoCapacity(
            f"the decode worker was lost after {num_sent} tokens, and a structured output cannot resume on another; retry the request"
        )
    resumed = params.clone()
    resumed.max_tokens = params.max_tokens - num_sent
    resumed.min_tokens = max(0, params.min_tokens - num_sent)
    resumed.prompt_logprobs = None  # the client has them
    return resumed


def _continuation(tokenizer, sent: list[int], params: SamplingParams) -> ContinuationText:
    stop = [] if params.include_stop_str_in_output else list(params.stop or [])
    return ContinuationText(tokenizer, sent, stop, params.skip_special_tokens)
