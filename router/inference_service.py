"""The public gRPC API, `pdcluster.v1.Inference`: Generate (stream) and Complete (unary).

A GenerateRequest becomes vLLM's own CompletionRequest (prompt, prompt_token_ids) or
ChatCompletionRequest (messages) and runs through the same vLLM serving classes as the HTTP
API, so both front doors validate, template and sample alike. HTTP statuses of vLLM's errors
map to gRPC codes here, once.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import grpc
from fastapi import FastAPI
from opentelemetry import context as otel_context
from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.exception_handling.error_response import ErrorResponse, create_error_response

from pdcluster.common.tracing import context_of
from pdcluster.protos import inference_pb2, inference_pb2_grpc
from pdcluster.router.caller import Caller, current_caller, set_caller
from pdcluster.router.model_dispatch import app_for, unknown_model_error
from pdcluster.router.model_routers import ModelRouters
from pdcluster.router.tenants import Tenants

_GRPC_CODES = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    HTTPStatus.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.UNPROCESSABLE_ENTITY: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.TOO_MANY_REQUESTS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    async def abort(self, context) -> None:
        """End the call with this status; a refusal for a limit says when to retry (`retry-after`)."""
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            context.set_trailing_metadata((("retry-after", str(current_caller().retry_after_s or 1)),))
        await context.abort(self.code, self.message)


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, routers: ModelRouters, apps: list[FastAPI]) -> None:
        """`apps`: each model's vLLM app, whose state holds its serving classes."""
        self._routers = routers
        self._apps = apps

    async def Generate(self, request, context):
        finished = None  # the last reply waits for the usage, which vLLM sends after it
        try:
            async for payload in self._stream(request, context):
                for choice in payload.get("choices", ()):
                    reply = _reply(choice, payload, request.request_id)
                    if reply.finish_reason:
                        finished = reply
                    elif reply.text or reply.token_ids:
                        yield reply
                if payload.get("usage") and finished is not None:
                    finished.usage.CopyFrom(_usage(payload["usage"]))
        except _Refused as e:
            await e.abort(context)
        if finished is not None:
            yield finished

    async def Complete(self, request, context):
        whole = inference_pb2.GenerateResponse()
        try:
            async for payload in self._stream(request, context):
                for choice in payload.get("choices", ()):
                    part = _reply(choice, payload, request.request_id)
                    whole.text += part.text
                    whole.token_ids.extend(part.token_ids)
                    whole.finish_reason = part.finish_reason or whole.finish_reason
                    whole.request_id = part.request_id
                if payload.get("usage"):
                    whole.usage.CopyFrom(_usage(payload["usage"]))
        except _Refused as e:
            await e.abort(context)
        return whole

    async def _stream(self, request: inference_pb2.GenerateRequest, context):
        """The request's chunks as vLLM streams them (OpenAI JSON), usage last."""
        metadata = dict(context.invocation_metadata())
        try:
            caller = Caller.from_headers(self._routers.endpoint.tenants, metadata)
        except ValueError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if caller is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required (metadata authorization: Bearer KEY)")
        set_caller(caller)
        if refusal := Tenants.model_refusal(caller.tenant, request.model, self._routers.model_names):
            self._routers.endpoint.usage.refused(caller.tenant.name, refusal.reason)
            raise _Refused(_GRPC_CODES.get(refusal.status, grpc.StatusCode.PERMISSION_DENIED), refusal.message)
        # The caller's trace (W3C traceparent in the metadata), current while vLLM's serving
        # classes run the request: they take trace headers from HTTP requests only.
        trace = context_of(metadata)
        token = otel_context.attach(trace) if trace is not None else None
        try:
            async for payload in self._serve(request, metadata):
                yield payload
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _serve(self, request: inference_pb2.GenerateRequest, metadata: dict):
        given = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
        if sum(given) != 1:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "set exactly one of prompt, prompt_token_ids, messages")
        body = _openai_body(request, self._routers.served_model_names[0])
        if request.messages:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            body["prompt"] = request.prompt or list(request.prompt_token_ids)
        metadata = {k.lower(): v for k, v in metadata.items() if isinstance(v, str)}
        body["model"] = self._routers.resolve_alias(body, current_caller().tenant.name, metadata) or body["model"]
        if error := unknown_model_error(self._apps, self._routers, body["model"]):
            _refuse(error.error.model_dump())
        state = self._apps[app_for(self._apps, body["model"])].state
        try:
            if request.messages:
                result = await state.openai_serving_chat.create_chat_completion(ChatCompletionRequest.model_validate(body), None)
            else:
                result = await state.openai_serving_completion.create_completion(CompletionRequest.model_validate(body), None)
        except ValidationError as e:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            ) from None
        except Exception as e:  # what vLLM's HTTP exception handlers answer, mapped by vLLM's own table
            _refuse(create_error_response(e).error.model_dump())
        if isinstance(result, ErrorResponse):
            _refuse(result.error.model_dump())
        async for event in result:
            data = event.removeprefix("data: ").strip()
            if data == "[DONE]":
                return
            payload = json.loads(data)
            if "error" in payload:
                _refuse(payload["error"])
            yield payload


def _openai_body(request: inference_pb2.GenerateRequest, default_model: str) -> dict:
    body = {
        "model": request.model or default_model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "max_tokens": request.max_tokens or None,
        "top_k": request.top_k or None,
        "stop": list(request.stop),
        "stop_token_ids": list(request.stop_token_ids),
        "ignore_eos": request.ignore_eos,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
    }
    if request.request_id:
        body["request_id"] = request.request_id
    if request.priority:
        body["priority"] = request.priority
    if request.session_id:
        body["session_id"] = request.session_id
    for name in ("temperature", "top_p", "seed", "repetition_penalty", "min_p"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    return body


def _refuse(error: dict):
    status = HTTPStatus(error.get("code") or HTTPStatus.INTERNAL_SERVER_ERROR)
    raise _Refused(_GRPC_CODES.get(status, grpc.StatusCode.INTERNAL), error.get("message", status.phrase))


def _reply(choice: dict, payload: dict, request_id: str) -> inference_pb2.GenerateResponse:
    text = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content") or ""
    reply = inference_pb2.GenerateResponse(
        text=text,
        token_ids=choice.get("token_ids") or (),
        finish_reason=choice.get("finish_reason") or "",
        request_id=request_id or payload["id"],
    )
    if payload.get("usage"):
        reply.usage.CopyFrom(_usage(payload["usage"]))
    return reply


def _usage(usage: dict) -> inference_pb2.Usage:
    details = usage.get("prompt_tokens_details") or {}
    return inference_pb2.Usage(
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
        cached_tokens=details.get("cached_tokens") or 0,
    )
