"""Running the router: the HTTP API (uvicorn) and the gRPC Inference service in one event
loop, until SIGINT, SIGTERM or SIGHUP; then both stop accepting and let running requests finish."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import Any

import grpc
import uvicorn
import uvloop

from pdcluster.common.files import write_atomically
from pdcluster.common.grpc_links import server_options
from pdcluster.common.logs import configure_logging
from pdcluster.common.process_lifetime import on_stop_signals
from pdcluster.common.tls import add_port
from pdcluster.common.worker_record import RouterRecord
from pdcluster.protos import inference_pb2_grpc
from pdcluster.router.body_size_limit import BodySizeLimit
from pdcluster.router.caller import CallerMiddleware
from pdcluster.router.config import RouterConfig
from pdcluster.router.inference_service import InferenceService
from pdcluster.router.listeners import PortTaken, RouterListeners, bind_listeners
from pdcluster.router.model_registry import with_registry_models
from pdcluster.router.model_routers import ModelRouters
from pdcluster.router.openai_frontend import build_openai_app

logger = logging.getLogger("pdcluster.router")


async def serve_router(configs: list[RouterConfig], on_ready=None, memberships=None, listeners: RouterListeners | None = None) -> None:
    """Serve until a signal: one model per config, on the first config's ports (see
    ModelRouters for `memberships`); `on_ready(record)` is called once both APIs listen. The
    ports are bound first (or were, in `listeners`)."""
    config = configs[0]
    listeners = listeners or bind_listeners(config)
    routers = ModelRouters(configs, memberships)
    await routers.start()
    dispatch, apps = await build_openai_app(routers)
    grpc_server = grpc.aio.server(options=server_options())
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(routers, apps), grpc_server)
    grpc_port = add_port(grpc_server, f"{config.host}:{listeners.release_grpc_port()}", config.tls, clients_need_cert=False)
    await grpc_server.start()

    sock = listeners.http
    http_port = sock.getsockname()[1]
    https: dict[str, Any] = dict(ssl_certfile=config.tls.cert, ssl_keyfile=config.tls.key) if config.tls.enabled else {}
    server = uvicorn.Server(
        uvicorn.Config(
            BodySizeLimit(
                CallerMiddleware(dispatch, routers.endpoint.tenants, routers.model_names, routers.endpoint.usage.refused),
                config.max_body_bytes,
            ),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=math.ceil(config.drain_timeout_s),
            **https,
        )
    )
    # Ours, so that uvicorn re-raising the signal after its shutdown only asks us to stop too.
    on_stop_signals(lambda: setattr(server, "should_exit", True))
    info = RouterRecord(
        http=f"{'https' if config.tls.enabled else 'http'}://{config.host}:{http_port}",
        grpc=f"{config.host}:{grpc_port}",
        model=routers.served_model_names[0],
        models=routers.served_model_names,
        pid=os.getpid(),
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        logger.info("router serving %s (HTTP) and %s (gRPC)", info.http, info.grpc)
        if config.ready_file:
            write_atomically(config.ready_file, info.model_dump_json())
        if on_ready is not None:
            on_ready(info)
    # Drain on a signal: uvicorn stops accepting and lets running responses (streams too)
    # finish; the gRPC server does the same at the same time.
    grpc_drained = asyncio.create_task(_stop_with(server, grpc_server, config.drain_timeout_s))
    try:
        await serving
    finally:
        server.should_exit = True
        await grpc_drained
        await routers.close()


async def _stop_with(server: uvicorn.Server, grpc_server: grpc.aio.Server, grace_s: float) -> None:
    """Stop the gRPC server (refusing new calls, finishing running ones) once uvicorn stops."""
    while not server.should_exit:
        await asyncio.sleep(0.1)
    await grpc_server.stop(grace=grace_s)


def run_router(config: RouterConfig) -> int:
    """Entry point of `python -m pdcluster.router`."""
    configure_logging()
    try:
        listeners = bind_listeners(config)
    except PortTaken as e:
        logger.error("%s", e)
        return 1
    uvloop.run(serve_router(with_registry_models(config), listeners=listeners))
    return 0
