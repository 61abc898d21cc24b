"""Prefill role: computes a prompt once and streams its KV to the chosen decode worker
(`worker/kv_production.py`), taking a prefix a peer holds from that peer where the router
says so (`peer_pull.py`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pdcluster.prefill_worker.peer_pull import PeerPulls
from pdcluster.protos import worker_pb2
from pdcluster.worker.kv_production import produce_kv, production_params
from pdcluster.worker.recent_latencies import RecentLatencies

if TYPE_CHECKING:
    from opentelemetry.trace import Span


class PrefillHandler:
    def __init__(self, host) -> None:
        self._host = host
        self._queued_tokens = 0
        self._pulls = PeerPulls(host)
        self.latencies = RecentLatencies()  # arrival to KV sent, per prompt

    @property
    def queued_prefill_tokens(self) -> int:
        return self._queued_tokens

    def latency_stats(self) -> dict:
        return {"prefill_seconds_p90": self.latencies.p90()}

    async def prefill(self, request: worker_pb2.PrefillRequest, context, span: Span) -> worker_pb2.PrefillReply:
        """`span`: the RPC's, which the engine's request joins."""
        params = await production_params(request, context)
        num_tokens = len(request.prompt_token_ids)
        self._queued_tokens += num_tokens
        arrived = time.monotonic()
        pull = self._pulls.start(request, params, span) if request.HasField("pull") else None
        try:
            reply = await produce_kv(self._host, request, params, context, span)
        finally:
            self._queued_tokens -= num_tokens
            if pull is not None and not pull.done():  # the engine is done with the prefix either way
                pull.cancel()
        self.latencies.add(time.monotonic() - arrived)
        return reply
