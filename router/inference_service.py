"""The public gRPC API, `pdcluster.v1.Inference`: Generate (stream) and Complete (unary)."""

from __future__ import annotations

import hmac

from pydantic import ValidationError

from pdcluster.protos import inference_pb2, inference_pb2_grpc
from pdcluster.router.choice_streams import Choice
from pdcluster.router.errors import InvalidRequest, RouterError, Unauthorized
from pdcluster.router.request_flow import Usage
from pdcluster.router.request_schemas import SamplingFields
from pdcluster.router.router_service import Router

DEFAULT_MAX_TOKENS = 16


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(self, request, context):
        try:
            choice = self._choice(request, context)
            async for delta in self._router.flow.generate(choice.request, choice.usage):
                reply = inference_pb2.GenerateResponse(
                    text=delta.text, token_ids=delta.token_ids, finish_reason=delta.finish_reason, request_id=choice.request.request_id
                )
                if delta.finish_reason:
                    reply.usage.CopyFrom(_usage(choice.usage))
                yield reply
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)

    async def Complete(self, request, context):
        try:
            choice = self._choice(request, context)
            async for delta in self._router.flow.generate(choice.request, choice.usage):
                choice.add(delta)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)
        return inference_pb2.GenerateResponse(
            text=choice.text,
            token_ids=choice.token_ids,
            finish_reason=choice.finish_reason,
            usage=_usage(choice.usage),
            request_id=choice.request.request_id,
        )

    def _choice(self, request: inference_pb2.GenerateRequest, context) -> Choice:
        router = self._router
        key = router.config.api_key
        if key:
            sent = dict(context.invocation_metadata()).get("authorization", "")
            if not hmac.compare_digest(sent, f"Bearer {key}"):
                raise Unauthorized("a valid API key is required (metadata authorization: Bearer KEY)")
        router.check_model(request.model)
        fields = _sampling_fields(request)
        given = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
        if sum(given) != 1:
            raise InvalidRequest("set exactly one of prompt, prompt_token_ids, messages")
        if request.messages:
            prompt = router.prompts.from_messages([{"role": m.role, "content": m.content} for m in request.messages])
        else:
            prompt = router.tokenize(request.prompt or list(request.prompt_token_ids))
        max_tokens = request.max_tokens or (None if request.messages else DEFAULT_MAX_TOKENS)
        return Choice(0, router.new_request(prompt, fields, max_tokens, request.request_id[:128]))


def _sampling_fields(request: inference_pb2.GenerateRequest) -> SamplingFields:
    values = {
        "top_k": request.top_k,
        "stop": list(request.stop) or None,
        "stop_token_ids": list(request.stop_token_ids) or None,
        "ignore_eos": request.ignore_eos,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
    }
    for name in ("temperature", "top_p", "seed", "repetition_penalty", "min_p"):
        if request.HasField(name):
            values[name] = getattr(request, name)
    try:
        return SamplingFields.model_validate(values)
    except ValidationError as e:
        raise InvalidRequest("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None


def _usage(usage: Usage) -> inference_pb2.Usage:
    return inference_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )
