"""The caller of the request being served: its tenant and its word on the response cache, set
by the front door (CallerMiddleware for HTTP, the Inference service for gRPC) in a context
variable the engine client reads; what the engine client decides comes back through it (a
refusal's Retry-After, a cache hit) for the front door to put on the response."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from http import HTTPStatus

from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

from pdcluster.router.asgi_body import json_fields, read_body, scope_headers, text_field
from pdcluster.router.config import TenantConfig
from pdcluster.router.tenants import DEFAULT_TENANT, Refusal, Tenants

CACHE_HEADER = "x-response-cache"  # request: on/off (over the tenant's setting); response: hit/miss
CACHE_WORDS = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


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
        """The caller its headers (or gRPC metadata) name; None for a key nobody holds.
        ValueError for a cache word that is neither on nor off."""
        tenant = tenants.identify(headers.get("authorization", ""))
        if tenant is None:
            return None
        word = headers.get(CACHE_HEADER)
        if word is not None and word.strip().lower() not in CACHE_WORDS:
            raise ValueError(f"{CACHE_HEADER} is on or off (true/false, 1/0), not {word!r}")
        return cls(tenant, None if word is None else CACHE_WORDS[word.strip().lower()])

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
    the body), and adds `Retry-After` to 429s and `x-response-cache` to answers the cache was
    asked for, streamed ones included. `refused(tenant, reason)` counts each refusal."""

    def __init__(self, app, tenants: Tenants, models: list[list[str]], refused: Callable[[str, str], None]) -> None:
        """`models`: each model's served names (see Tenants.model_refusal)."""
        self.app = app
        self._tenants = tenants
        self._models = models
        self._refused = refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope_headers(scope)
        try:
            caller = Caller.from_headers(self._tenants, headers) or Caller()  # an unknown key: vLLM's check answers 401
        except ValueError as e:
            return await _refusal_response(Refusal(HTTPStatus.BAD_REQUEST, "header", str(e)))(scope, receive, send)
        set_caller(caller)
        caller.responses_api = scope["path"] == "/v1/responses"
        if scope["method"] == "POST" and (caller.responses_api or (caller.tenant.models and scope["path"].startswith("/v1/"))):
            body, receive = await read_body(receive)
            named = json_fields(body)
            caller.previous_response_id = text_field(named.get("previous_response_id"))
            if refusal := Tenants.model_refusal(caller.tenant, text_field(named.get("model")), self._models):
                self._refused(caller.tenant.name, refusal.reason)
                return await _refusal_response(refusal)(scope, receive, send)
        # A stream's headers leave before its first chunk is made, and with it the cache's
        # answer: a caller who uses the cache gets the headers with the first chunk.
        held: list[dict] = []

        async def send_with_headers(message):
            if message["type"] == "http.response.start" and caller.uses_cache:
                held.append(message)
                return
            if held:
                await send(_with_caller_headers(held.pop(), caller))
            await send(_with_caller_headers(message, caller) if message["type"] == "http.response.start" else message)

        await self.app(scope, receive, send_with_headers)


def _with_caller_headers(start: dict, caller: Caller) -> dict:
    extra = []
    if start["status"] == HTTPStatus.TOO_MANY_REQUESTS:
        extra.append((b"retry-after", str(caller.retry_after_s or 1).encode()))
    if caller.cache:
        extra.append((CACHE_HEADER.encode(), caller.cache.encode()))
    return {**start, "headers": [*start.get("headers", ()), *extra]}


def _refusal_response(refusal: Refusal) -> JSONResponse:
    error = create_error_response(refusal.message, err_type=refusal.status.phrase, status_code=refusal.status)
    headers = {"retry-after": str(refusal.retry_after_s)} if refusal.retry_after_s else None
    return JSONResponse(error.model_dump(), refusal.status, headers=headers)
