"""The caller of the request being served: its tenant and its word on the response cache, set
by the front door (CallerMiddleware for HTTP, the Inference service for gRPC) in a context
variable the engine client reads; what the engine client decides comes back through it (a
refusal's Retry-After, a cache hit) for the front door to put on the response."""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass
from http import HTTPStatus

from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

from pdcluster.router.config import TenantConfig
from pdcluster.router.tenants import DEFAULT_TENANT, Refusal, Tenants

CACHE_HEADER = "x-response-cache"  # request: on/off (over the tenant's setting); response: hit/miss


@dataclass
class Caller:
    tenant: TenantConfig = DEFAULT_TENANT
    wants_cache: bool | None = None  # the request's own word; None: the tenant's setting
    retry_after_s: int | None = None  # set with a refusal for a limit
    cache: str = ""  # "hit" or "miss" once the cache was asked
    responses_api: bool = False  # a /v1/responses request: its turns chain by response id
    previous_response_id: str | None = None

    @classmethod
    def from_headers(cls, tenants: Tenants, headers: dict[str, str]) -> Caller | None:
        """The caller its headers (or gRPC metadata) name; None for a key nobody holds."""
        tenant = tenants.identify(headers.get("authorization", ""))
        if tenant is None:
            return None
        word = headers.get(CACHE_HEADER, "").strip().lower()
        return cls(tenant, {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}.get(word))

    @property
    def uses_cache(self) -> bool:
        return self.tenant.response_cache if self.wants_cache is None else self.wants_cache


_CALLER: ContextVar[Caller | None] = ContextVar("pdcluster_caller", default=None)


def current_caller() -> Caller:
    caller = _CALLER.get()
    if caller is None:  # a call from no front door (tests of the flow): the default tenant's
        caller = Caller()
        _CALLER.set(caller)
    return caller


def set_caller(caller: Caller) -> None:
    _CALLER.set(caller)


class CallerMiddleware:
    """ASGI: identifies the caller, refuses a model its tenant may not use (before vLLM parses
    the body), and adds `Retry-After` to 429s and `x-response-cache` to cached answers."""

    def __init__(self, app, tenants: Tenants, served_names: list[str]) -> None:
        self.app = app
        self._tenants = tenants
        self._served_names = served_names

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        caller = Caller.from_headers(self._tenants, headers) or Caller()  # an unknown key: vLLM's check answers 401
        set_caller(caller)
        caller.responses_api = scope["path"] == "/v1/responses"
        if scope["method"] == "POST" and (caller.responses_api or (caller.tenant.models and scope["path"].startswith("/v1/"))):
            body, receive = await _read_body(receive)
            named = _json_fields(body)
            caller.previous_response_id = _text(named.get("previous_response_id"))
            if refusal := Tenants.model_refusal(caller.tenant, _text(named.get("model")), self._served_names):
                return await _refusal_response(refusal)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = []
                if message["status"] == HTTPStatus.TOO_MANY_REQUESTS:
                    extra.append((b"retry-after", str(caller.retry_after_s or 1).encode()))
                if caller.cache:
                    extra.append((CACHE_HEADER.encode(), caller.cache.encode()))
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _json_fields(body: bytes) -> dict:
    try:
        fields = json.loads(body)
    except ValueError:
        return {}  # vLLM's own parsing answers a malformed body
    return fields if isinstance(fields, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


async def _read_body(receive):
    """The whole body (its size already bounded by BodySizeLimit), and a receive that replays it."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return body, replay


def _refusal_response(refusal: Refusal) -> JSONResponse:
    error = create_error_response(refusal.message, err_type=refusal.status.phrase, status_code=refusal.status)
    headers = {"retry-after": str(refusal.retry_after_s)} if refusal.retry_after_s else None
    return JSONResponse(error.model_dump(), refusal.status, headers=headers)
