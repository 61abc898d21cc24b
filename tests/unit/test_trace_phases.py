"""The latency benchmark's reading of a request's trace: the marks it passed, in order, and the
phases between them (spans as the OTLP receiver keeps them)."""

from __future__ import annotations

import pytest

from pdcluster.bench.trace_phases import marks, phases
from pdcluster.bench.trace_receiver import ReceivedSpan

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5
MS = 1_000_000  # ns


def span(name: str, service: str, start_ms: float, end_ms: float, kind: int = SERVER, **extra) -> ReceivedSpan:
    return ReceivedSpan(
        trace_id="t",
        span_id=f"{name}-{service}-{kind}",
        parent_id="",
        name=name,
        service=f"pdcluster-{service}",
        kind=kind,
        start_ns=int(start_ms * MS),
        end_ns=int(end_ms * MS),
        attributes=extra.get("attributes", {}),
        events=extra.get("events", {}),
    )


def engine(service: str, start_ms: float, ttft_ms: float) -> ReceivedSpan:
    return span("llm_request", service, start_ms, start_ms + ttft_ms + 5, attributes={"gen_ai.latency.time_to_first_token": ttft_ms / 1e3})


def disaggregated(offset_ms: float) -> list[ReceivedSpan]:
    """A request the router took at `offset_ms`, every mark 1 ms after the last but the engines'."""
    t = offset_ms
    return [
        span("router.request", "router", t, t + 60, events={"first_token": int((t + 30) * MS)}),
        span("pdcluster.v1.Worker/Decode", "router", t + 0.5, t + 60, CLIENT),
        span("pdcluster.v1.Worker/Decode", "decode", t + 1.5, t + 60),
        span("pdcluster.v1.Worker/Prefill", "router", t + 1, t + 20, CLIENT),
        span("pdcluster.v1.Worker/Prefill", "prefill", t + 2, t + 19),
        engine("prefill", t + 3, 10),  # first token at t + 13
        engine("decode", t + 2.5, 24.5),  # first token at t + 27
        span("kv_transfer.send", "prefill", t + 4, t + 15, PRODUCER),
        span("kv_transfer.receive", "decode", t + 3, t + 16, CONSUMER),
    ]


def test_a_disaggregated_requests_marks_follow_it_through_both_workers():
    at = marks(disaggregated(100.0))
    assert at == pytest.approx(
        {
            "router_in": 0,
            "prefill_rpc_sent": 1,
            "prefill_rpc_in": 2,
            "prefill_engine_in": 3,
            "prefill_first_token": 13,
            "kv_sent": 15,
            "kv_handed_over": 16,
            "decode_first_token": 27,
            "router_first_token": 30,
        }
    )
    # Its decode RPC runs beside the prefill: not a step on its way to the first token.
    assert "decode_rpc_in" not in at


def test_a_request_on_one_engine_passes_the_decode_marks():
    spans = [s for s in disaggregated(0.0) if "Prefill" not in s.name and "prefill" not in s.service and "kv" not in s.name]
    assert list(marks(spans)) == [
        "router_in",
        "decode_rpc_sent",
        "decode_rpc_in",
        "decode_engine_in",
        "decode_first_token",
        "router_first_token",
    ]


def test_phases_are_medians_between_consecutive_marks_and_a_retried_request_is_left_out():
    traces = [disaggregated(0.0), disaggregated(500.0)]
    retried = disaggregated(900.0) + [span("pdcluster.v1.Worker/Prefill", "router", 950, 960, CLIENT)]
    assert marks(retried) == {}  # two prefill calls: the phases of either would mislead
    rows = dict(phases([*traces, retried]))
    assert rows["prefill_engine_in -> prefill_first_token"] == pytest.approx(10)
    assert rows["kv_handed_over -> decode_first_token"] == pytest.approx(11)
    assert sum(rows.values()) == pytest.approx(30)  # router_in to router_first_token
    assert marks([span("kv_transfer.send", "prefill", 0, 1, PRODUCER)]) == {}  # no router span: not a request
