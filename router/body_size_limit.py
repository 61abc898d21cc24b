"""Refusing request bodies over the router's limit before anything parses them, with a 413
in vLLM's error shape the client can read."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

DISCARD_LIMIT_BYTES = 64 << 20


async def _discard_body(receive) -> None:
    seen = 0
    while seen <= DISCARD_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


class BodySizeLimit:
    """ASGI wrapper refusing bodies over the limit (declared or streamed) with a 413 the
    client can read."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) <= self.max_bytes:
                return await self.app(scope, receive, send)  # the server holds the body to this length
            await _discard_body(receive)
            return await self._too_large(scope, receive, send)
        # A streamed (chunked) body: read it whole, within the limit, before the app sees it.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                if more:
                    await _discard_body(receive)
                return await self._too_large(scope, receive, send)
        pending = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        error = create_error_response(f"the request body exceeds {self.max_bytes} bytes", err_type=status.phrase, status_code=status)
        await JSONResponse(error.model_dump(), status)(scope, receive, send)
