"""Which model's app serves a request: the one whose base model or LoRA adapter its `model`
names, or the one its model alias picks; a request naming no model goes to the first model's
app, and one naming a model served nowhere here gets vLLM's 404, naming every model served
here. `GET /v1/models` lists every app's models and the aliases."""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus

import vllm.envs as envs
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.exception_handling.error_response import ErrorResponse, create_error_response

from pdcluster.router.asgi_body import json_fields, read_body, replaying, scope_headers, text_field
from pdcluster.router.caller import current_caller
from pdcluster.router.model_routers import ModelRouters


def serves(app: FastAPI, name: str) -> bool:
    """Whether the app's model is served under `name`, base model or loaded adapter."""
    models = app.state.openai_serving_models
    return models.is_base_model(name) or name in models.lora_requests


def app_for(apps: Sequence[FastAPI], name: str | None) -> int:
    """The index of the app serving `name`; the first for none."""
    if name:
        for index, app in enumerate(apps):
            if serves(app, name):
                return index
    return 0


class ModelDispatch:
    """ASGI over one vLLM OpenAI app per model, and the model aliases (ModelRouters): a request
    to an alias goes on as one to the model the alias picks, so the response names it.
    Requests that name no model (health, metrics, the cluster view) go to the first app."""

    def __init__(self, apps: Sequence[FastAPI], routers: ModelRouters) -> None:
        self._apps = list(apps)
        self._routers = routers

    async def __call__(self, scope, receive, send):
        aliases = self._routers.endpoint.aliases
        if scope["type"] != "http" or (len(self._apps) == 1 and not aliases):
            return await self._apps[0](scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            return await self._list_models(scope, receive, send)
        name = None
        if scope["method"] == "POST":
            body, receive = await read_body(receive)
            fields = json_fields(body)
            name = text_field(fields.get("model"))
            if name in aliases:
                headers = scope_headers(scope)
                fields["model"] = name = self._routers.resolve_alias(fields, current_caller().tenant.name, headers)
                scope, receive = _with_body(scope, receive, json.dumps(fields).encode())
            elif error := unknown_model_error(self._apps, self._routers, name):
                return await JSONResponse(error.model_dump(), HTTPStatus.NOT_FOUND)(scope, receive, send)
        await self._apps[app_for(self._apps, name)](scope, receive, send)

    async def _list_models(self, scope, receive, send):
        """Each app's own answer (its auth check included), their model lists joined, and the
        aliases; the first refusal as it is."""
        listed: list[dict] = []
        for app in self._apps:
            start, body = await _response_of(app, scope, receive)
            if start["status"] != HTTPStatus.OK:
                await send(start)
                return await send({"type": "http.response.body", "body": body})
            listed += json.loads(body)["data"]
        listed += [
            {"id": name, "object": "model", "owned_by": "pdcluster", "root": None, "parent": None}
            for name in self._routers.endpoint.aliases
        ]
        joined = json.dumps({"object": "list", "data": listed}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(joined)).encode())]
        await send({"type": "http.response.start", "status": HTTPStatus.OK, "headers": headers})
        await send({"type": "http.response.body", "body": joined})


def unknown_model_error(apps: Sequence[FastAPI], routers: ModelRouters, name: str | None) -> ErrorResponse | None:
    """vLLM's 404 for a model served nowhere here, naming every model (and alias) that is;
    None where the first app's own check answers: one model and no alias, or vLLM may load
    the adapter a request names (a LoRA resolver)."""
    if not name or (len(apps) == 1 and not routers.endpoint.aliases) or envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        return None
    if name in routers.endpoint.aliases or any(serves(app, name) for app in apps):
        return None
    served = ", ".join([*routers.served_model_names, *routers.endpoint.aliases])
    message = f"The model `{name}` does not exist. Valid aliases: {served}."
    return create_error_response(message, err_type="NotFoundError", status_code=HTTPStatus.NOT_FOUND, param="model")


def _with_body(scope, receive, body: bytes):
    """The request with its body replaced (and its content-length with it)."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"content-length"]
    scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
    return scope, replaying(body, receive)


async def _response_of(app, scope, receive) -> tuple[dict, bytes]:
    """A whole (unstreamed) response of `app`: its start message and body."""
    start: dict = {}
    chunks: list[bytes] = []

    async def capture(message):
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, capture)
    return start, b"".join(chunks)
