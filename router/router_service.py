"""The router's parts wired together: the worker pool and its membership, the request flow,
metrics, and vLLM's engine client over them that both front doors (HTTP, gRPC) serve through."""

from __future__ import annotations

import dataclasses

from pdcluster.common.cluster_token import local_cluster_token
from pdcluster.common.registry import RedisRegistry
from pdcluster.common.tiny_model.generate import ensure_tiny_model
from pdcluster.common.tracing import start_router_tracing
from pdcluster.common.vllm_args import PDCLUSTER_DEFAULTS, engine_args_from_flags, vllm_serve_args
from pdcluster.common.worker_auth import token_metadata
from pdcluster.common.worker_record import Role
from pdcluster.router.config import RouterConfig
from pdcluster.router.endpoint import Endpoint
from pdcluster.router.engine_client import ClusterEngineClient
from pdcluster.router.membership import MembershipFollower, follow_registry
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.prefix_cache_watch import PrefixCacheWatch
from pdcluster.router.request_flow import RequestFlow
from pdcluster.router.worker_pool import WorkerPool


class Router:
    def __init__(self, config: RouterConfig, endpoint: Endpoint, membership=None) -> None:
        """One model's router; `endpoint`: what it shares with the other models' routers.
        `membership`: an async callable returning worker addresses (the cluster controller's
        view); without it, the Redis registry or the fixed `config.workers`."""
        from vllm.config import ModelConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.renderers import renderer_from_config
        from vllm.usage.usage_lib import UsageContext

        self.config = config
        self.endpoint = endpoint
        self.tenants = endpoint.tenants
        self.vllm_args = vllm_serve_args(config.model or str(ensure_tiny_model()), config.vllm_args, self.tenants.api_keys)
        # As vLLM: served under each --served-model-name, or under --model as given.
        self.served_model_names = self.vllm_args.served_model_name or [self.vllm_args.model]
        # The workers' model config (their engine arguments that shape it, over pdcluster's
        # defaults), but for what the router's own flags set.
        given = set(engine_args_from_flags(config.vllm_args)[0])
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - given - {"model"}
        shared = {k: v for k, v in {**PDCLUSTER_DEFAULTS, **config.engine}.items() if k in model_fields}
        engine_args = dataclasses.replace(AsyncEngineArgs.from_cli_args(self.vllm_args), **shared)
        vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        # Traced where the workers' engines are (or where the router's own flags say).
        traces_endpoint = vllm_config.observability_config.otlp_traces_endpoint or config.engine.get("otlp_traces_endpoint")
        if traces_endpoint:
            start_router_tracing(traces_endpoint)
        self.pool = WorkerPool(
            config.workers,
            config.health_interval_s,
            config.tls,
            on_departed=self._forget,
            health_timeout_s=config.health_timeout_s,
            unhealthy_after=config.unhealthy_after,
        )
        # Without a token or a registry to read it from: the one workers started by hand on this machine share.
        token = config.worker_token or ("" if config.registry else local_cluster_token(config.cluster_name))
        self.pool.metadata = token_metadata(token)
        self.metrics = RouterMetrics(self.pool, vllm_config)
        renderer = renderer_from_config(vllm_config)
        self.flow = RequestFlow(self.pool, config, self.metrics, renderer.tokenizer)
        self.engine = ClusterEngineClient(
            vllm_config,
            renderer,
            self.flow,
            self.pool,
            self.tenants,
            endpoint.usage,
            self.served_model_names[0],
            endpoint.response_cache,
            tracing=bool(traces_endpoint),
        )
        self._membership = membership
        self._follower: MembershipFollower | None = None
        self._registry: RedisRegistry | None = None
        self._prefix_watch: PrefixCacheWatch | None = None
        if config.prefill_routing == "kv-events":
            self._prefix_watch = PrefixCacheWatch(self.pool, self.flow.prefix_index, config.health_interval_s)

    def cost_per_hour(self) -> float:
        """What its healthy workers cost now, at their pools' rates."""
        rates = self.config.cost_per_hour
        return rates.prefill * len(self.pool.healthy(Role.PREFILL)) + rates.decode * len(self.pool.healthy(Role.DECODE))

    def saturated(self, at_inflight: int) -> bool:
        """Whether it takes no more work now: requests queue for admission, `at_inflight` run
        (0: no such bound), or no decode worker is healthy."""
        gate = self.flow.admission
        return gate.queued > 0 or 0 < at_inflight <= gate.running or not self.pool.healthy(Role.DECODE)

    def _forget(self, worker) -> None:
        """A worker left the membership: its cached prefixes left with it."""
        self.flow.prefix_index.forget(worker.worker_id)

    async def start(self) -> None:
        cfg = self.config
        if cfg.registry:
            self._follower, self._registry = follow_registry(
                self.pool,
                self.flow.prefix_index,
                cfg.registry,
                cfg.cluster_name,
                cfg.health_interval_s,
                follow_token=not cfg.worker_token,
            )
        elif self._membership is not None:
            self._follower = MembershipFollower(self.pool, self._membership, cfg.health_interval_s)
        if self._follower is not None:
            await self._follower.start()
        await self.pool.start()
        if self._prefix_watch is not None:
            self._prefix_watch.start()

    async def close(self) -> None:
        if self._prefix_watch is not None:
            await self._prefix_watch.close()
        if self._follower is not None:
            await self._follower.close()
        if self._registry is not None:
            await self._registry.close()
        await self.pool.close()
