"""OpenTelemetry across the cluster: one request is one trace, from the router through the
Decode and Prefill RPCs and both engines to the KV transfer between them.

Tracing is on where vLLM's `--otlp-traces-endpoint` is given. vLLM exports the spans: each
worker's engine sets up its exporter (and its engine core's), the router sets up the same one
(`start_router_tracing`). W3C trace context rides in gRPC metadata from the router to the
workers, and in vLLM's own `trace_headers` from a worker into its engine, where vLLM's
`llm_request` span and our connector's transfer spans join the trace. Without an endpoint,
OpenTelemetry's spans are no-ops and nothing is injected.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = "pdcluster"

CLIENT, SERVER, INTERNAL = SpanKind.CLIENT, SpanKind.SERVER, SpanKind.INTERNAL
PRODUCER, CONSUMER = SpanKind.PRODUCER, SpanKind.CONSUMER
NO_SPAN: Span = trace.INVALID_SPAN  # a span that records nothing: where no trace was started
WORKER_SERVICE = "pdcluster.v1.Worker"


def name_service(service: str) -> None:
    """The service name the spans of this process (and the engine processes it starts) carry,
    unless the environment names one (OTEL_SERVICE_NAME, as OpenTelemetry reads it)."""
    os.environ.setdefault("OTEL_SERVICE_NAME", service)


def start_router_tracing(endpoint: str) -> None:
    """Export the router's spans to `endpoint` as vLLM's engines export theirs."""
    from vllm.tracing import init_tracer

    name_service("pdcluster-router")
    init_tracer(_TRACER, endpoint)


class _UnseededIds(RandomIdGenerator):
    """Span and trace ids from the OS: vLLM seeds Python's `random` in its engine processes
    (the engine's --seed), from which OpenTelemetry draws them, so two engines with one seed
    would give their spans the same ids."""

    def generate_span_id(self) -> int:
        return int.from_bytes(os.urandom(8)) or 1

    def generate_trace_id(self) -> int:
        return int.from_bytes(os.urandom(16)) or 1


def draw_ids_unseeded() -> None:
    """For an engine process: the spans its tracer provider (vLLM's) starts from now on take
    ids that no seed repeats."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.id_generator = _UnseededIds()


def start_span(name: str, parent: Context | Span | None, kind: SpanKind = INTERNAL, attributes: Mapping | None = None) -> Span:
    """A span under `parent` (a context, a span, or none: a new trace). The caller ends it;
    nothing becomes current, so it is safe across the yields of a stream."""
    if isinstance(parent, Span):
        parent = trace.set_span_in_context(parent)
    return trace.get_tracer(_TRACER).start_span(name, context=parent, kind=kind, attributes=attributes)


def worker_rpc_span(method: str, parent: Context | Span | None, kind: SpanKind, attributes: Mapping | None = None) -> Span:
    """One side of a Worker RPC, named as OpenTelemetry's RPC conventions name it."""
    rpc = {"rpc.system": "grpc", "rpc.service": WORKER_SERVICE, "rpc.method": method}
    return start_span(f"{WORKER_SERVICE}/{method}", parent, kind, {**rpc, **(attributes or {})})


def end_span(span: Span, failure: str | BaseException | None = None) -> None:
    if failure:
        span.set_status(Status(StatusCode.ERROR, str(failure)))
    span.end()


@contextlib.contextmanager
def ending(span: Span) -> Iterator[Span]:
    """End `span` when the block ends, failed if it raised; without making it current (safe
    around the yields of a stream)."""
    failure: BaseException | None = None
    try:
        yield span
    except Exception as e:
        failure = e
        raise
    finally:
        end_span(span, failure)


def headers_of(span: Span | None) -> dict[str, str]:
    """The W3C headers (traceparent, tracestate) that make a callee's spans children of
    `span`; empty when it records nothing."""
    carrier: dict[str, str] = {}
    if span is not None and span.get_span_context().is_valid:
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def context_of(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Context | None:
    """The trace context in W3C headers or gRPC metadata; None where there is none."""
    if not headers:
        return None
    carrier = dict(headers) if not isinstance(headers, Mapping) else headers
    return _PROPAGATOR.extract(carrier) if "traceparent" in carrier else None


def with_trace(metadata: tuple, span: Span) -> tuple:
    """gRPC call metadata carrying `span` as the callee's parent."""
    return (*metadata, *headers_of(span).items())
