"""An OTLP/gRPC trace receiver on loopback, built on OpenTelemetry's own protocol definitions
(opentelemetry-proto): it keeps the spans the cluster's processes export, for the latency
benchmark's per-phase breakdown and for the tests. Point vLLM's `--otlp-traces-endpoint` at
`endpoint`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # hex, as W3C traceparent writes it
    span_id: str
    parent_id: str  # "" for a trace's root
    name: str
    service: str  # its process's service.name
    kind: int  # OTLP's SpanKind number: 2 server, 3 client, 4 producer, 5 consumer
    start_ns: int
    end_ns: int
    attributes: dict = field(hash=False)
    events: dict = field(hash=False)  # name -> time (ns) of its first occurrence
    error: str = ""  # the status message of a span that failed


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port(f"{host}:0")
        self.endpoint = f"http://{host}:{port}"
        self._server.start()

    def Export(self, request, context):
        received = [
            _span(span, _service(resource_spans.resource))
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """Every span received once `done(spans)` holds (processes export in batches, every
        few seconds); what there is when `timeout_s` passes otherwise."""
        deadline = time.monotonic() + timeout_s
        while not done(spans := self.spans()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return spans

    def close(self) -> None:
        self._server.stop(grace=None)


def _service(resource) -> str:
    return next((a.value.string_value for a in resource.attributes if a.key == "service.name"), "")


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _span(span, service: str) -> ReceivedSpan:
    events: dict[str, int] = {}
    for event in span.events:
        events.setdefault(event.name, event.time_unix_nano)
    return ReceivedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        name=span.name,
        service=service,
        kind=span.kind,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        attributes={a.key: _value(a.value) for a in span.attributes},
        events=events,
        error=span.status.message if span.status.code == span.status.STATUS_CODE_ERROR else "",
    )
