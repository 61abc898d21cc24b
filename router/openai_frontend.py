"""The router's HTTP API: vLLM's own OpenAI server (its app, routes, protocol and serving
classes, as `vllm serve` builds them) over ClusterEngineClient, plus the cluster view
(`/cluster`), the router's metrics on vLLM's `/metrics`, and every worker's metrics endpoint for
Prometheus's HTTP service discovery (`/prometheus/targets`). The gRPC Inference service
serves through the same serving classes (`app.state`)."""

from __future__ import annotations

from fastapi import Depends, FastAPI, HTTPException, Request
from prometheus_client.registry import Collector
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.app import build_app
from vllm.v1.metrics.prometheus import get_prometheus_registry

from pdcluster.router.caller import current_caller
from pdcluster.router.cluster_view import ClusterView, ScrapeTargets, scrape_targets
from pdcluster.router.engine_client import SUPPORTED_TASKS
from pdcluster.router.router_service import Router


class _RouterCollector(Collector):
    """The router's own metrics, served on vLLM's /metrics beside vLLM's HTTP metrics."""

    def __init__(self, router: Router) -> None:
        self._registry = router.metrics.registry

    def collect(self):
        yield from self._registry.collect()


async def build_openai_app(router: Router) -> FastAPI:
    args = router.vllm_args
    app = build_app(args, SUPPORTED_TASKS, router.engine.model_config)
    await init_app_state(router.engine, app.state, args, SUPPORTED_TASKS)
    _add_cluster_view(app, router)
    get_prometheus_registry().register(_RouterCollector(router))
    return app


def _add_cluster_view(app: FastAPI, router: Router) -> None:
    def authorized(request: Request) -> None:
        if not router.is_admin(request.headers.get("authorization", "")):
            raise HTTPException(401, "the router's API key is required (Authorization: Bearer KEY)")

    @app.get("/v1/usage")
    async def usage(request: Request) -> dict:
        """The caller's tenant's usage; every tenant's for the router's own key (vLLM's layer checks the key)."""
        authorization = request.headers.get("authorization", "")
        if router.is_admin(authorization):
            return router.usage.report()
        return router.usage.report([current_caller().tenant.name])

    @app.get("/cluster", dependencies=[Depends(authorized)])
    async def cluster() -> ClusterView:
        return ClusterView(
            model=router.served_model_names[0],
            workers=[w.describe() for w in router.pool.workers()],
            prefix_index_blocks=router.flow.prefix_index.sizes(),
        )

    @app.get("/prometheus/targets", dependencies=[Depends(authorized)])
    async def prometheus_targets() -> list[ScrapeTargets]:
        return scrape_targets([w.describe() for w in router.pool.workers()])
