"""The router's two calls to workers in one attempt, and what their failures mean.

Each call ends at once when the pool finds its worker lost (gone or frozen): the RPC is
cancelled here, so the worker drops the request if it ever wakes. A failure that says the
request itself is wrong is the client's error; any other is the worker's (`WorkerFailed`),
and the request goes on elsewhere.
"""

from __future__ import annotations

import asyncio

import grpc
from vllm.exceptions import VLLMValidationError

from pdcluster.common.worker_record import Role
from pdcluster.protos import worker_pb2
from pdcluster.router.worker_pool import WorkerView

LOST = "lost: it stopped answering health checks"
# Codes that say the request itself is wrong: retrying elsewhere would fail the same way.
_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


class WorkerFailed(Exception):
    def __init__(self, worker: WorkerView, role: str, reason: str) -> None:
        super().__init__(f"{role} worker {worker.address}: {reason}")
        self.worker, self.role = worker, role


def classify(error: grpc.aio.AioRpcError, worker: WorkerView, role: str) -> Exception:
    if error.code() in _CLIENT_ERRORS:
        return VLLMValidationError(error.details() or "invalid request")
    return WorkerFailed(worker, role, f"{error.code().name}: {error.details()}")


def failure_of(task: asyncio.Task | None) -> BaseException | None:
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()


def _cancel_when_lost(worker: WorkerView, call) -> asyncio.Task:
    """A watcher that cancels `call` as soon as the pool finds `worker` lost. Cancel the
    watcher once done with the call."""
    watch = asyncio.ensure_future(worker.lost.wait())
    watch.add_done_callback(lambda w: w.cancelled() or call.cancel())
    return watch


def _fired(watch: asyncio.Task) -> bool:
    return watch.done() and not watch.cancelled()


class DecodeCall:
    """One attempt's token stream from its decode worker. With a prefill running beside it,
    a failed prefill ends the stream (decode must not wait for KV that will not come), and
    the prefill's failure is the one raised."""

    def __init__(self, worker: WorkerView, request: worker_pb2.DecodeRequest, metadata, idle_timeout_s: float) -> None:
        self.worker = worker
        self._idle_timeout_s = idle_timeout_s
        self._stream = worker.stub.Decode(request, metadata=metadata)
        self._watch = _cancel_when_lost(worker, self._stream)
        self._prefill: asyncio.Task | None = None

    def end_if_fails(self, prefill: asyncio.Task) -> None:
        self._prefill = prefill
        prefill.add_done_callback(lambda task: failure_of(task) and self._stream.cancel())

    async def chunks(self):
        while True:
            try:
                chunk = await asyncio.wait_for(self._stream.read(), self._idle_timeout_s)
            except TimeoutError:
                raise WorkerFailed(self.worker, Role.DECODE, f"no token for {self._idle_timeout_s:.0f}s") from None
            except asyncio.CancelledError:
                # grpc.aio reports our own stream.cancel() (the worker lost, or a failed prefill) this way.
                if asyncio.current_task().cancelling():
                    raise
                if _fired(self._watch):
                    raise WorkerFailed(self.worker, Role.DECODE, LOST) from None
                if failure_of(self._prefill) is None:
                    raise
                raise failure_of(self._prefill) from None
            except grpc.aio.AioRpcError as e:
                raise failure_of(self._prefill) or classify(e, self.worker, Role.DECODE) from None
            if chunk is grpc.aio.EOF:
                return
            yield chunk

    def close(self) -> None:
        self._watch.cancel()
        self._stream.cancel()  # no-op once finished; aborts the request on the worker otherwise


async def prefill(worker: WorkerView, request: worker_pb2.PrefillRequest, metadata, timeout_s: float) -> worker_pb2.PrefillReply:
    call = worker.stub.Prefill(request, timeout=timeout_s, metadata=metadata)
    watch = _cancel_when_lost(worker, call)
    try:
        return await call
    except asyncio.CancelledError:
        if _fired(watch) and not asyncio.current_task().cancelling():
            raise WorkerFailed(worker, Role.PREFILL, LOST) from None
        raise
    except grpc.aio.AioRpcError as e:
        raise classify(e, worker, Role.PREFILL) from None
    finally:
        watch.cancel()
        call.cancel()  # no-op once answered; aborts the prefill on the worker otherwise


LOAD_LORA_TIMEOUT_S = 120.0
# Codes that say the adapter cannot be loaded; any other is a worker away for a moment, which
# loads the adapter with its first request for it.
_ADAPTER_REFUSED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


async def load_lora(workers: list[WorkerView], adapter: worker_pb2.LoRAAdapter, metadata) -> None:
    """Load `adapter` on each worker at once; a worker's refusal raises with its message
    (vLLM's own, for an adapter not found)."""
    results = await asyncio.gather(
        *(w.stub.LoadLoRA(adapter, metadata=metadata, timeout=LOAD_LORA_TIMEOUT_S) for w in workers), return_exceptions=True
    )
    for worker, result in zip(workers, results, strict=True):
        if isinstance(result, grpc.aio.AioRpcError) and result.code() in _ADAPTER_REFUSED:
            raise ValueError(f"{worker.worker_id}: {result.details()}")
        if isinstance(result, BaseException) and not isinstance(result, grpc.aio.AioRpcError):
            raise result
