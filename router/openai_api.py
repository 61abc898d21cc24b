"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, health, metrics,
cluster view. Errors are OpenAI-shaped JSON with a 4xx/5xx status."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdcluster.common.worker_record import ROLES
from pdcluster.router.choice_streams import Choice, merged_deltas, total_usage
from pdcluster.router.errors import InvalidRequest, PayloadTooLarge, RouterError, Unauthorized
from pdcluster.router.request_schemas import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from pdcluster.router.router_service import Router

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI and vLLM default for /v1/completions


class CompletionFormat:
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    @staticmethod
    def chunk_choice(choice: Choice, text: str, finish_reason: str | None, first: bool) -> dict:
        return {"index": choice.index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def final_choice(choice: Choice) -> dict:
        return {"index": choice.index, "text": choice.text, "logprobs": None, "finish_reason": choice.finish_reason}


class ChatFormat:
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    @staticmethod
    def chunk_choice(choice: Choice, text: str, finish_reason: str | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def final_choice(choice: Choice) -> dict:
        message = {"role": "assistant", "content": choice.text}
        return {"index": choice.index, "message": message, "logprobs": None, "finish_reason": choice.finish_reason}


def build_app(router: Router) -> FastAPI:
    app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)

    def authorized(request: Request) -> None:
        key = router.config.api_key
        if key and not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
            raise Unauthorized("a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        counts = {role.value: len(router.pool.healthy(role)) for role in ROLES}
        return JSONResponse({"status": "ok" if router.pool.ready() else "unavailable", **counts}, 200 if router.pool.ready() else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/cluster", dependencies=[Depends(authorized)])
    async def cluster():
        return {
            "model": router.model_name,
            "workers": [w.describe() for w in router.pool.workers()],
            "prefix_index_blocks": router.flow.prefix_index.sizes(),
        }

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [router.describe_model()]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        _check_common(router, body)
        prompts = [router.tokenize(p) for p in body.prompts()]
        max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        return await _respond(router, body, prompts, max_tokens, CompletionFormat, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_common(router, body)
        prompt = router.prompts.from_messages([m.as_template_input() for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _respond(router, body, [prompt], max_tokens, ChatFormat, request)

    return _BodySizeLimit(app, router.config.max_body_bytes)


def _check_common(router: Router, body: OpenAIRequest) -> None:
    router.check_model(body.model)
    router.check_n(body.n)


async def _respond(router: Router, body: OpenAIRequest, prompts: list[list[int]], max_tokens, fmt, request: Request):
    rid = body.request_id or uuid.uuid4().hex
    choices = [
        Choice(p * body.n + i, router.new_request(prompt, body, max_tokens, f"{rid}-{p * body.n + i}"))
        for p, prompt in enumerate(prompts)
        for i in range(body.n)
    ]
    head = {"id": fmt.id_prefix + rid, "created": int(time.time()), "model": router.model_name}
    deltas = merged_deltas(router.flow, choices)
    if not body.stream:
        if not await _until_disconnected(request, _collect(deltas)):
            return Response(status_code=499)  # nobody is listening; the workers were told to stop
        result = {**head, "object": fmt.object_name, "choices": [fmt.final_choice(c) for c in choices]}
        return {**result, "usage": total_usage(choices, len(prompts))}
    # Wait for the first token before answering, so errors up to then get a real status.
    first = await anext(deltas, None)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _sse(head, fmt, choices, len(prompts), first, deltas, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _collect(deltas) -> None:
    async for choice, delta in deltas:
        choice.add(delta)


async def _sse(head, fmt, choices, prompt_count, first, deltas, include_usage):
    started: set[int] = set()

    def event(choice: Choice, delta) -> str:
        choice.add(delta)
        payload = {
            **head,
            "object": fmt.chunk_object,
            "choices": [fmt.chunk_choice(choice, delta.text, delta.finish_reason or None, choice.index not in started)],
        }
        started.add(choice.index)
        return _data(payload)

    try:
        if first is not None:
            yield event(*first)
        async for choice, delta in deltas:
            yield event(choice, delta)
    except RouterError as e:  # the status line is gone: report in the stream, as vLLM does
        yield _data(e.openai_body())
        return
    finally:
        await deltas.aclose()  # a client that left mid-stream aborts its workers' requests now
    if include_usage:
        yield _data({**head, "object": fmt.chunk_object, "choices": [], "usage": total_usage(choices, prompt_count)})
    yield "data: [DONE]\n\n"


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _until_disconnected(request: Request, coro):
    """Run `coro`; if the client goes away first, cancel it (aborting its workers' requests)
    and return False."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()  # no-op when it finished
    await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        return False
    work.result()  # raises the request's error, if any
    return True


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def router_error(request: Request, e: RouterError):
        return JSONResponse(e.openai_body(), e.http_status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(InvalidRequest(_validation_message(e), param=_validation_param(e)).openai_body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        error = RouterError(str(e.detail))
        error.error_type = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error.openai_body(), e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return JSONResponse(RouterError(f"internal error: {type(e).__name__}").openai_body(), 500)


def _validation_message(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def _validation_param(e: RequestValidationError) -> str | None:
    errors = e.errors()
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
    return loc[0] if loc else None


# How much of an oversized body is read and dropped before the 413: a server that answers and
# closes while the client is still sending makes the client see a reset instead of the answer.
DISCARD_LIMIT_BYTES = 64 << 20


async def _discard_body(receive) -> None:
    seen = 0
    while seen <= DISCARD_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


class _BodySizeLimit:
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
        error = PayloadTooLarge(f"the request body exceeds {self.max_bytes} bytes", code="payload_too_large")
        await JSONResponse(error.openai_body(), error.http_status)(scope, receive, send)
