"""The process shell shared by prefill and decode workers.

It starts vLLM's async engine with our KV connector, serves the internal `Worker` gRPC
service (the role's handler answers Prefill or Decode; Health and Stats are answered
here), exports Prometheus metrics, and drains in-flight requests before it exits on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Protocol

import grpc
import psutil
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from pdcluster.common.cluster_token import local_cluster_token
from pdcluster.common.files import write_atomically
from pdcluster.common.grpc_links import server_options
from pdcluster.common.kv_compatibility import kv_compatibility
from pdcluster.common.logs import configure_logging
from pdcluster.common.periodic import cancel_all, run_periodically
from pdcluster.common.registry import HEARTBEAT_INTERVAL_S, RedisRegistry
from pdcluster.common.start_marks import StartMarks
from pdcluster.common.tls import add_port
from pdcluster.common.tracing import SERVER, context_of, ending, name_service, worker_rpc_span
from pdcluster.common.worker_auth import WorkerTokenCheck
from pdcluster.common.worker_record import ROLES, Role, WorkerRecord
from pdcluster.kv_transfer.kv_transfer_service import fetch_kv_stats
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.vllm_version import check_vllm_version
from pdcluster.protos import kv_transfer_pb2, worker_pb2, worker_pb2_grpc
from pdcluster.worker.config import WorkerConfig
from pdcluster.worker.engine_args import engine_kwargs, follow_kv_events, pd_kv_transfer, prepare_environment
from pdcluster.worker.kv_production import produce_kv, production_params

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM
from pdcluster.worker.lora_adapters import LoRAAdapters
from pdcluster.worker.metrics import WorkerCollector, start_metrics_server
from pdcluster.worker.prefix_cache_mirror import PrefixCacheMirror

logger = logging.getLogger("pdcluster.worker")

DRAIN_TIMEOUT_S = 30.0


class RoleHandler(Protocol):
    """What a pool adds to the shell: the RPC its role serves (`prefill` or `decode`)."""

    @property
    def queued_prefill_tokens(self) -> int: ...

    def latency_stats(self) -> dict:
        """WorkerStats fields: the role's recent latencies."""


BUSY_GAP_CAP_S = 1.0  # a longer gap between engine steps is idle time, not one long step


def _scheduler_stats_logger(holder: dict):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerStatsLogger(StatLoggerBase):
        """Keeps the engine's latest scheduler stats for Stats and metrics, and the running
        totals the controller turns into cost per token and utilization."""

        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            holder.setdefault("totals", {"prompt_tokens": 0, "generation_tokens": 0, "busy_seconds": 0.0})
            self._last = (time.monotonic(), False)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            totals, now = holder["totals"], time.monotonic()
            if iteration_stats is not None:
                totals["prompt_tokens"] += iteration_stats.num_prompt_tokens
                totals["generation_tokens"] += iteration_stats.num_generation_tokens
            if scheduler_stats is not None:
                holder["scheduler"] = scheduler_stats
                then, was_running = self._last
                if was_running:  # the engine worked through the time since its last step
                    totals["busy_seconds"] += min(now - then, BUSY_GAP_CAP_S)
                self._last = (now, scheduler_stats.num_running_reqs > 0)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerStatsLogger


class WorkerHost(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, handler_classes: dict[Role, type]) -> None:
        """`handler_classes`: the role's handler, or with `config.role_switching` both roles'."""
        if config.role not in handler_classes or (config.role_switching and len(handler_classes) < len(ROLES)):
            raise ValueError(f"a {config.role} worker{' that switches roles' if config.role_switching else ''} needs its role handlers")
        self.config = config
        self.worker_id = config.worker_id or f"{config.role}-{uuid.uuid4().hex[:8]}"
        self._handler_classes = handler_classes
        self._handlers: dict[Role, RoleHandler] = {}
        self.engine: AsyncLLM | None = None
        self.kv_endpoint = ""
        self.kv_settings = KVEndpointSettings()
        self._scheduler_stats: dict = {}
        self._kv_stats = kv_transfer_pb2.KVStats()
        self._active = 0
        self._draining = False  # stopping: for good
        self._switching = False  # draining to serve the other role
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self.prefix_cache: PrefixCacheMirror | None = None  # where the engine publishes KV events
        self.lora = LoRAAdapters()
        self._tasks: list[asyncio.Task] = []
        self.port = 0
        self.metrics_port = 0
        self.start_marks = StartMarks(process=psutil.Process().create_time(), main=time.time())

    # -- lifecycle --------------------------------------------------------------------

    async def _shared_token(self) -> str:
        if not self.config.registry:
            return local_cluster_token(self.config.cluster_name)
        registry = RedisRegistry(self.config.registry, self.config.cluster_name)
        try:
            return await registry.shared_token()
        finally:
            await registry.close()

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        check_vllm_version()  # before the engine loads for a minute
        if not self.config.auth_token:  # started by hand: never open
            self.config = self.config.model_copy(update={"auth_token": await self._shared_token()})
        cfg = self.config
        prepare_environment(cfg.engine)
        if cfg.engine.vllm_args.get("otlp_traces_endpoint"):  # vLLM's engine exports the spans
            name_service("pdcluster-worker" if cfg.role_switching else f"pdcluster-{cfg.role}")
        scratch = tempfile.mkdtemp(prefix="pdcluster-kv-")
        endpoint_file = os.path.join(scratch, "endpoint.json")
        self.kv_settings = KVEndpointSettings(
            **dict(cfg.kv), host=cfg.host, auth_token=cfg.auth_token, endpoint_file=endpoint_file, tls=cfg.tls
        )
        kwargs = engine_kwargs(cfg.engine, pd_kv_transfer(self.kv_settings.model_dump(mode="json")))
        # Every role: a prefill worker's prefix places prompts; a decode worker's (a conversation's
        # earlier turns, answers included) lets a router compute a turn's new tokens there.
        events, replay = follow_kv_events(kwargs, scratch)
        if events:
            self.prefix_cache = PrefixCacheMirror()
            self._tasks.append(asyncio.create_task(self.prefix_cache.follow(events, replay)))
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=[_scheduler_stats_logger(self._scheduler_stats)])
        with open(endpoint_file) as f:
            self.kv_endpoint = json.load(f)["endpoint"]
        self._kv_stats = await fetch_kv_stats(self.kv_endpoint, tls=cfg.tls)  # the engine's compile time, from its process
        self.start_marks = self.start_marks.model_copy(update={"engine": time.time(), "compile_s": self._kv_stats.engine_compile_seconds})
        self._handlers = {role: cls(self) for role, cls in self._handler_classes.items()}
        self.kv_compatibility = kv_compatibility(self.engine.vllm_config)

        # Token streams and small RPCs: the bulk-KV options (16 MiB frames, write buffering)
        # do not belong here; only room for long prompts' token lists.
        self._server = grpc.aio.server(
            options=server_options([("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]),
            interceptors=[WorkerTokenCheck(cfg.auth_token)],
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = add_port(self._server, f"{cfg.host}:{cfg.port}", cfg.tls)
        await self._server.start()
        registry = CollectorRegistry()
        registry.register(WorkerCollector(self))
        self.metrics_port = start_metrics_server(registry, cfg.host, cfg.metrics_port)
        logger.info(
            "%s worker %s serving on %s:%d (KV %s, metrics %d)",
            cfg.role,
            self.worker_id,
            cfg.host,
            self.port,
            self.kv_endpoint,
            self.metrics_port,
        )
        await self._set_serving(True)
        if cfg.ready_file:
            write_atomically(cfg.ready_file, self.record().model_dump_json())

    @property
    def handler(self) -> RoleHandler:
        return self._handlers[self.config.role]

    def record(self) -> WorkerRecord:
        return WorkerRecord(
            worker_id=self.worker_id,
            role=self.config.role,
            address=f"{self.config.host}:{self.port}",
            kv_endpoint=self.kv_endpoint,
            metrics_port=self.metrics_port,
            pid=os.getpid(),
            start=self.start_marks,
        )

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", self.config.role.value):  # the whole server, and this role's service
            await self._health.set(service, status)

    async def switch_role(self, role: Role) -> float:
        """Drain (routers see `draining` and stop sending; running requests finish), then serve
        `role`; returns the seconds the drain took. A drain that does not end in time leaves
        the worker in its old role, serving again."""
        started = time.monotonic()
        if role == self.config.role:
            return 0.0
        self._switching = True
        await self._set_serving(False)
        try:
            deadline = started + DRAIN_TIMEOUT_S
            while self._active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._active:
                raise TimeoutError(f"{self._active} requests still running after {DRAIN_TIMEOUT_S:.0f}s")
            logger.info("worker %s: %s -> %s", self.worker_id, self.config.role, role)
            self.config = self.config.model_copy(update={"role": role})
        finally:
            self._switching = False
            if not self._draining:
                await self._set_serving(True)
        return time.monotonic() - started

    async def serve_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [*self._tasks, run_periodically(self._refresh_stats, 1.0, logger)]
        registry = None
        if self.config.registry:
            registry = RedisRegistry(self.config.registry, self.config.cluster_name)
            # Redis away for a moment: the record expires and routers skip this worker until it is back.
            tasks.append(run_periodically(lambda: registry.announce(self.record()), HEARTBEAT_INTERVAL_S, logger))
        await stop.wait()
        await cancel_all(tasks)
        if registry is not None:  # routers stop sending before the drain starts
            with contextlib.suppress(Exception):
                await registry.withdraw(self.worker_id)
            await registry.close()
        await self.drain_and_stop()

    async def drain_and_stop(self) -> None:
        """Refuse new work, let running requests (and their KV pulls) finish, then exit."""
        self._draining = True
        await self._set_serving(False)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self.engine is not None:
            self.engine.shutdown()

    async def _refresh_stats(self) -> None:
        """What Stats answers from: the KV endpoint's counters, and the adapters the engine holds."""
        self._kv_stats = await fetch_kv_stats(self.kv_endpoint, tls=self.config.tls)
        if self.engine is not None and self.engine.vllm_config.lora_config is not None:
            await self.lora.refresh(self.engine)

    # -- request accounting shared by the role handlers --------------------------------

    @contextlib.contextmanager
    def traced(self, method: str, context):
        """The server side of a Worker RPC, in the caller's trace (its gRPC metadata)."""
        with ending(
            worker_rpc_span(method, context_of(context.invocation_metadata()), SERVER, {"pdcluster.worker_id": self.worker_id})
        ) as span:
            yield span

    @contextlib.contextmanager
    def admitted(self):
        if self._draining or self._switching:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    # -- Worker service ---------------------------------------------------------------

    async def Prefill(self, request, context):
        if self.config.role != Role.PREFILL:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this is a {self.config.role} worker")
        try:
            with self.admitted(), self.traced("Prefill", context) as span:
                return await self.handler.prefill(request, context, span)
        except _Refused as e:
            await context.abort(e.code, e.message)

    async def SendPrefix(self, request, context):
        if request.HasField("pull"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a prefix sent for a peer is not pulled from another")
        try:
            with self.admitted(), self.traced("SendPrefix", context) as span:
                return await produce_kv(self, request, await production_params(request, context), context, span)
        except _Refused as e:
            await context.abort(e.code, e.message)

    async def Decode(self, request, context):
        if self.config.role != Role.DECODE:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this is a {self.config.role} worker")
        try:
            with self.admitted(), self.traced("Decode", context) as span:
                async for chunk in self.handler.decode(request, context, span):
                    yield chunk
        except _Refused as e:
            await context.abort(e.code, e.message)

    async def Stats(self, request, context):
        return await self.stats()

    async def SwitchRole(self, request, context):
        if not self.config.role_switching:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker was not started with role switching")
        if request.role not in ROLES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role must be one of {', '.join(ROLES)}, not {request.role!r}")
        if (self._draining or self._switching) and request.role != self.config.role:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        try:
            drained = await self.switch_role(Role(request.role))
        except TimeoutError as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        return worker_pb2.SwitchRoleReply(role=self.config.role, drained_seconds=drained)

    async def LoadLoRA(self, request, context):
        from vllm.exceptions import LoRAAdapterNotFoundError

        if self.engine.vllm_config.lora_config is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "LoRA adapters are not enabled on this worker (--enable-lora)")
        if not request.name or not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an adapter needs a name and a path")
        try:
            await self.engine.add_lora(self.lora.request_for(request))
        except LoRAAdapterNotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except Exception as e:  # vLLM's word on a bad adapter (rank, modules, ...)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        await self.lora.refresh(self.engine)
        return worker_pb2.LoadLoRAReply()

    async def WatchPrefixCache(self, request, context):
        if self.prefix_cache is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker publishes no prefix-cache events")
        async for update in self.prefix_cache.watch():
            yield update

    async def stats(self) -> worker_pb2.WorkerStats:
        # No call to the engine's KV endpoint here: routers and the controller take a late
        # answer for a hung worker, so this answers at once from the last refresh (1 s old at most).
        sched = self._scheduler_stats.get("scheduler")
        cache = self.engine.vllm_config.cache_config
        total = cache.num_gpu_blocks or 0
        sent, received = self._kv_stats.bytes_sent_by_transport, self._kv_stats.bytes_received_by_transport
        usage = sched.kv_cache_usage if sched else 0.0
        return worker_pb2.WorkerStats(
            role=self.config.role,
            worker_id=self.worker_id,
            pid=os.getpid(),
            metrics_port=self.metrics_port,
            lora_adapters=self.lora.loaded,
            kv_compatibility=self.kv_compatibility,
            running=sched.num_running_reqs if sched else 0,
            queued=sched.num_waiting_reqs if sched else 0,
            free_kv_blocks=int(total * (1.0 - usage)),
            total_kv_blocks=total,
            kv_bytes_sent=self._kv_stats.bytes_sent,
            kv_bytes_received=self._kv_stats.bytes_received,
            kv_transport=self.config.kv.transport,
            kv_bytes_by_transport={k: sent.get(k, 0) + received.get(k, 0) for k in {*sent, *received}},
            kv_transfers_by_transport=self._kv_stats.transfers_by_transport,
            kv_endpoint=self.kv_endpoint,
            model=self.engine.vllm_config.model_config.model,
            queued_prefill_tokens=self.handler.queued_prefill_tokens,
            block_size=cache.block_size,
            draining=self._draining or self._switching,
            max_model_len=self.engine.vllm_config.model_config.max_model_len,
            **self._scheduler_stats.get("totals", {}),
            **self.handler.latency_stats(),
        )


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


def run_worker(config: WorkerConfig, handler_classes: dict[Role, type]) -> None:
    """Entry point of `python -m pdcluster.prefill_worker` / `decode_worker` / `role_switching_worker`."""
    configure_logging()

    async def main() -> None:
        host = WorkerHost(config, handler_classes)
        await host.start()
        await host.serve_until_signalled()

    uvloop.run(main())
