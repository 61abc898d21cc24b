"""The cluster token on the internal `Worker` service: workers refuse calls without it, and
routers and the controller send it (`authorization: Bearer TOKEN` metadata). The standard
health service stays open to probes."""

from __future__ import annotations

import hmac

import grpc

WORKER_SERVICE_PREFIX = "/pdcluster.v1.Worker/"


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """What a caller sends with each Worker call; nothing when the cluster has no token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class WorkerTokenCheck(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(WORKER_SERVICE_PREFIX):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "the Worker service needs the cluster token (authorization: Bearer TOKEN)"
    codecs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:

        async def refuse_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, as the stream's handler must be

        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codecs)

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
