"""What middleware reads of an HTTP request ahead of the app: its headers, and its body (to
see its JSON fields), then replayed to the app."""

from __future__ import annotations

import json


def scope_headers(scope) -> dict[str, str]:
    """The request's headers, names in lower case."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def json_fields(body: bytes) -> dict:
    try:
        fields = json.loads(body)
    except ValueError:
        return {}  # vLLM's own parsing answers a malformed body
    return fields if isinstance(fields, dict) else {}


def text_field(value) -> str | None:
    return value if isinstance(value, str) and value else None


async def read_body(receive):
    """The whole body (its size already bounded by BodySizeLimit), and a receive that replays it."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    return body, replaying(body, receive)


def replaying(body: bytes, receive):
    """A receive that gives `body` first, then what `receive` gives (the client leaving)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay
