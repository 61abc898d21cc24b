"""An in-process `grpc.aio` Worker for router tests: no engine behind it, behaviour on demand.

Its "model" is a fixed function of the sequence so far (`next_token`), so any worker continues
any sequence the same way: a request resumed elsewhere must come out exactly as an
uninterrupted one. Text is the tokenizer's, logprobs are a fixed function of the token.

A decode call with a transfer id waits, as a real decode worker does, until a prefill worker
in the same process reports that transfer's KV sent; without one it computes the prompt itself.
What each worker was asked and what happened to the calls is recorded in `calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field

import grpc

from pdcluster.common.sample_wire import decode_sampling_params, encode_logprobs
from pdcluster.protos import worker_pb2, worker_pb2_grpc

VOCAB_START, VOCAB_SPAN = 262, 600  # whole-character tokens of the tiny model's tokenizer (below 262: bytes)
_kv_sent: dict[str, asyncio.Event] = {}  # transfer id -> set once its prefill is done


def next_token(sequence: list[int]) -> int:
    return VOCAB_START + (sum(sequence) * 31 + len(sequence)) % VOCAB_SPAN


def token_logprob(token: int) -> float:
    return -((token % 7) + 1) / 8


def expected_tokens(prompt: list[int], count: int) -> list[int]:
    sequence = list(prompt)
    for _ in range(count):
        sequence.append(next_token(sequence))
    return sequence[len(prompt) :]


@dataclass
class Behaviour:
    fail_after: int | None = None  # end the call with `fail_code` after this many tokens (0: at once)
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    failures_left: int | None = None  # how many calls may fail (None: all); share one Behaviour to share the count
    hang_after: int | None = None  # stop answering (this call, and Stats: a frozen worker) after this many tokens
    token_delay_s: float = 0.0
    queued: int = 0  # requests its Stats say wait in its engine (a saturated worker)


@dataclass
class Call:
    rpc: str
    request: object
    outcome: str = "running"  # finished | failed | cancelled


@dataclass
class FakeWorker(worker_pb2_grpc.WorkerServicer):
    role: str
    tokenizer: object
    behaviour: Behaviour = field(default_factory=Behaviour)
    address: str = ""
    calls: list[Call] = field(default_factory=list)
    frozen: asyncio.Event = field(default_factory=asyncio.Event)
    _server: grpc.aio.Server | None = None

    async def start(self) -> FakeWorker:
        self._server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self._server.start()
        return self

    async def stop(self) -> None:
        await self._server.stop(grace=None)

    def calls_of(self, rpc: str) -> list[Call]:
        return [c for c in self.calls if c.rpc == rpc]

    # -- the Worker service ------------------------------------------------------------

    async def Stats(self, request, context):
        if self.frozen.is_set():
            await asyncio.Event().wait()  # until the caller gives up
        running = sum(c.outcome == "running" for c in self.calls)
        return worker_pb2.WorkerStats(
            role=self.role,
            worker_id=f"{self.role}-{self.address}",
            pid=os.getpid(),
            running=running,
            queued=self.behaviour.queued,
            free_kv_blocks=1000,
            total_kv_blocks=1000,
            kv_endpoint=f"kv-{self.address}",
            block_size=16,
            max_model_len=4096,
        )

    async def Prefill(self, request, context):
        async with self._recorded("Prefill", request):
            await self._misbehave(0, context)
            first = next_token(list(request.prompt_token_ids))
            _kv_event(request.target.transfer_id).set()
            return worker_pb2.PrefillReply(first_token_id=first, num_cached_tokens=16)

    async def Decode(self, request, context):
        async with self._recorded("Decode", request):
            params = decode_sampling_params(request.sampling_params)
            if request.HasField("transfer_id"):
                await _kv_event(request.transfer_id).wait()
            sequence = list(request.prompt_token_ids)
            generated: list[int] = []
            for i in range(params.max_tokens):
                await self._misbehave(i, context)
                if self.behaviour.token_delay_s:
                    await asyncio.sleep(self.behaviour.token_delay_s)
                token = next_token(sequence)
                sequence.append(token)
                text = self._text(generated, token)
                generated.append(token)
                chunk = worker_pb2.DecodeChunk(token_ids=[token], text=text, num_prompt_tokens=len(request.prompt_token_ids))
                if params.logprobs is not None:
                    chunk.logprobs = encode_logprobs([{token: _Logprob(token_logprob(token))}])
                    chunk.cumulative_logprob = sum(token_logprob(t) for t in generated)
                if i == params.max_tokens - 1:
                    chunk.finish_reason = "length"
                yield chunk

    def _text(self, generated: list[int], token: int) -> str:
        before = self.tokenizer.decode(generated)
        return self.tokenizer.decode([*generated, token])[len(before) :]

    @contextlib.asynccontextmanager
    async def _recorded(self, rpc: str, request):
        call = Call(rpc, request)
        self.calls.append(call)
        try:
            yield
            call.outcome = "finished"
        except asyncio.CancelledError:
            call.outcome = "cancelled"
            raise
        except BaseException:
            call.outcome = "failed"
            raise

    async def _misbehave(self, tokens_sent: int, context) -> None:
        b = self.behaviour
        if b.hang_after is not None and tokens_sent >= b.hang_after:
            self.frozen.set()
            await asyncio.Event().wait()
        if b.fail_after is not None and tokens_sent >= b.fail_after and b.failures_left != 0:
            if b.failures_left is not None:
                b.failures_left -= 1
            await context.abort(b.fail_code, f"fake {self.role} worker fails after {tokens_sent} tokens")


@dataclass
class _Logprob:
    logprob: float
    rank: int = 1
    decoded_token: str | None = None


def _kv_event(transfer_id: str) -> asyncio.Event:
    return _kv_sent.setdefault(transfer_id, asyncio.Event())
