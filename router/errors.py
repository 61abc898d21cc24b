"""Errors of the router's own making. vLLM's OpenAI layer answers a GracefulHTTPError with the
status it carries, so clients see them as they see vLLM's own (its QueueOverflowError is a 503
too); the gRPC Inference service maps the same statuses to codes."""

from __future__ import annotations

from http import HTTPStatus

from vllm.exceptions import GracefulHTTPError


class Overloaded(GracefulHTTPError):
    """The router's queue is full: 429, retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, HTTPStatus.TOO_MANY_REQUESTS)


class NoCapacity(GracefulHTTPError):
    """No healthy worker could serve the request, retries included: 503, retry here or elsewhere."""

    def __init__(self, message: str) -> None:
        super().__init__(message, HTTPStatus.SERVICE_UNAVAILABLE)
