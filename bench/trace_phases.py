"""Where a request's time to first token goes, read from its trace: the moments it passes
(the router, each RPC, each engine, the KV transfer) and the phases between consecutive ones.

A mark is a span's start or end, or a moment a span records (the router's first token; an
engine's first token: vLLM's `llm_request` start plus its time to first token), on the clock
of the one machine the processes share. Marks are ms since the router took the request, or,
on vLLM's own server, since its engine did.
"""

from __future__ import annotations

import statistics
from collections import Counter

from pdcluster.bench.trace_receiver import ReceivedSpan

SERVER, CLIENT = 2, 3
# In the order a request passes them. A disaggregated request's decode RPC runs beside its
# prefill, so its marks are left out there; a request on one engine passes the decode ones.
MARKS = (
    "router_in",
    "prefill_rpc_sent",
    "prefill_rpc_in",
    "prefill_engine_in",
    "prefill_first_token",
    "kv_sent",
    "kv_handed_over",
    "decode_rpc_sent",
    "decode_rpc_in",
    "decode_engine_in",
    "decode_first_token",
    "router_first_token",
)
_DECODE_START = ("decode_rpc_sent", "decode_rpc_in", "decode_engine_in")


def _one(spans: list[ReceivedSpan], name: str, service: str = "", kind: int | None = None) -> ReceivedSpan | None:
    found = [s for s in spans if s.name == name and service in s.service and (kind is None or s.kind == kind)]
    return found[0] if len(found) == 1 else None


def engine_ttft_ms(engine: ReceivedSpan) -> float:
    """vLLM's own measure: its engine's arrival to first token."""
    return engine.attributes["gen_ai.latency.time_to_first_token"] * 1e3


def marks(spans: list[ReceivedSpan]) -> dict[str, float]:
    """One request's marks (ms since the router took it); empty for a trace without the
    router's span or with two of one kind (a retried request)."""
    root = _one(spans, "router.request")
    kinds = Counter((s.name, s.service, s.kind) for s in spans)
    if root is None or "first_token" not in root.events or max(kinds.values()) > 1:
        return {}

    def rpc(method: str, kind: int) -> int | None:
        span = _one(spans, f"pdcluster.v1.Worker/{method}", kind=kind)
        return span.start_ns if span else None

    prefill, decode = _one(spans, "llm_request", "prefill"), _one(spans, "llm_request", "decode")
    send, receive = _one(spans, "kv_transfer.send"), _one(spans, "kv_transfer.receive")
    at = {
        "router_in": root.start_ns,
        "prefill_rpc_sent": rpc("Prefill", CLIENT),
        "prefill_rpc_in": rpc("Prefill", SERVER),
        "prefill_engine_in": prefill.start_ns if prefill else None,
        "prefill_first_token": prefill.start_ns + engine_ttft_ms(prefill) * 1e6 if prefill else None,
        "kv_sent": send.end_ns if send else None,
        "kv_handed_over": receive.end_ns if receive else None,
        "decode_rpc_sent": rpc("Decode", CLIENT),
        "decode_rpc_in": rpc("Decode", SERVER),
        "decode_engine_in": decode.start_ns if decode else None,
        "decode_first_token": decode.start_ns + engine_ttft_ms(decode) * 1e6 if decode else None,
        "router_first_token": root.events["first_token"],
    }
    if at["prefill_rpc_sent"] is not None:
        at = {k: v for k, v in at.items() if k not in _DECODE_START}
    return {k: (v - root.start_ns) / 1e6 for k, v in at.items() if v is not None}


def phases(traces: list[list[ReceivedSpan]]) -> list[tuple[str, float]]:
    """("earlier -> later", median ms between them) over the requests of one path, for each
    pair of consecutive marks they all passed."""
    per_request = [m for m in map(marks, traces) if m]
    if not per_request:
        return []
    passed = [name for name in MARKS if all(name in m for m in per_request)]
    return [
        (f"{earlier} -> {later}", statistics.median(m[later] - m[earlier] for m in per_request))
        for earlier, later in zip(passed, passed[1:], strict=False)
    ]
