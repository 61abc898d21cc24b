"""The router's HTTP API: vLLM's own OpenAI server (its app, routes, protocol and serving
classes, as `vllm serve` builds them) over each model's ClusterEngineClient, plus the cluster view
(`/cluster`), the router's metrics on vLLM's `/metrics`, and every worker's metrics endpoint for
Prometheus's HTTP service discovery (`/prometheus/targets`). The gRPC Inference service
serves through the same serving classes (`app.state`)."""

from __future__ import annotations

from fastapi import Depends, FastAPI, HTTPException, Request
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.app import build_app
from vllm.v1.metrics.prometheus import get_prometheus_registry

from pdcluster.router.caller import current_caller
from pdcluster.router.cluster_view import ClusterView, ScrapeTargets, WorkerSummary, scrape_targets
from pdcluster.router.engine_client import SUPPORTED_TASKS
from pdcluster.router.model_dispatch import ModelDispatch
from pdcluster.router.model_routers import ModelRouters


class _RouterCollector(Collector):
    """Every model's router metrics, served on vLLM's /metrics beside vLLM's HTTP metrics, and
    the tenants' usage. With several models, each series carries its model's `model_name` (as
    vLLM's own do)."""

    def __init__(self, routers: ModelRouters) -> None:
        self._routers = routers

    def collect(self):
        yield from self._routers.endpoint.registry.collect()
        if len(self._routers.routers) == 1:
            yield from self._routers.first.metrics.registry.collect()
            return
        families: dict[str, Metric] = {}
        for router in self._routers.routers:
            model = router.served_model_names[0]
            for family in router.metrics.registry.collect():
                joined = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
                joined.samples += [s._replace(labels={"model_name": model, **s.labels}) for s in family.samples]
        yield from families.values()


async def build_openai_app(routers: ModelRouters) -> tuple[ModelDispatch, list[FastAPI]]:
    """The HTTP API: one vLLM OpenAI app per model behind the model dispatch, and each app."""
    apps = []
    for router in routers.routers:
        args = router.vllm_args
        app = build_app(args, SUPPORTED_TASKS, router.engine.model_config)
        await init_app_state(router.engine, app.state, args, SUPPORTED_TASKS)
        _add_cluster_view(app, routers)
        apps.append(app)
    get_prometheus_registry().register(_RouterCollector(routers))
    return ModelDispatch(apps, routers), apps


def _add_cluster_view(app: FastAPI, routers: ModelRouters) -> None:
    endpoint = routers.endpoint

    def authorized(request: Request) -> None:
        if not endpoint.is_admin(request.headers.get("authorization", "")):
            raise HTTPException(401, "the router's API key is required (Authorization: Bearer KEY)")

    def workers() -> list[WorkerSummary]:
        return [w.describe() for router in routers.routers for w in router.pool.workers()]

    @app.get("/v1/usage")
    async def usage(request: Request) -> dict:
        """The caller's tenant's usage; every tenant's for the router's own key (vLLM's layer checks the key)."""
        authorization = request.headers.get("authorization", "")
        if endpoint.is_admin(authorization):
            return endpoint.usage.report()
        return endpoint.usage.report([current_caller().tenant.name])

    @app.get("/cluster", dependencies=[Depends(authorized)])
    async def cluster() -> ClusterView:
        return ClusterView(
            model=routers.first.served_model_names[0],
            workers=workers(),
            prefix_index_blocks={k: v for router in routers.routers for k, v in router.flow.prefix_index.sizes().items()},
            models={r.served_model_names[0]: [w.worker_id for w in r.pool.workers()] for r in routers.routers},
        )

    @app.get("/prometheus/targets", dependencies=[Depends(authorized)])
    async def prometheus_targets() -> list[ScrapeTargets]:
        return scrape_targets(workers())
