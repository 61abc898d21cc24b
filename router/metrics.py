"""The router's Prometheus metrics: its own (prefix `pdcluster_router_`), a per-worker view, and
each request's figures under vLLM's names (VllmRequestMetrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdcluster.common.worker_load import kv_cache_usage
from pdcluster.common.worker_record import ROLES
from pdcluster.router.vllm_request_metrics import VllmRequestMetrics
from pdcluster.router.worker_pool import WorkerPool

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)


class RouterMetrics:
    def __init__(self, pool: WorkerPool, vllm_config=None) -> None:
        """`vllm_config`: the served model's, for vLLM's request metrics (None: without them,
        as unit tests of the flow run without a model)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.vllm = VllmRequestMetrics(vllm_config) if vllm_config is not None else None
        if self.vllm:
            r.register(self.vllm.collector())
        self.ttft = Histogram("pdcluster_router_ttft_seconds", "Time to first token", registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("pdcluster_router_itl_seconds", "Time between output tokens", registry=r, buckets=_ITL_BUCKETS)
        self.e2e = Histogram("pdcluster_router_e2e_seconds", "Request latency, arrival to last token", registry=r, buckets=_LATENCY_BUCKETS)
        self.requests = Counter("pdcluster_router_requests", "Requests by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("pdcluster_router_queue_depth", "Requests waiting for an admission slot", registry=r)
        self.inflight = Gauge("pdcluster_router_inflight_requests", "Requests being served", registry=r)
        self.retries = Counter(
            "pdcluster_router_retries", "Attempts restarted on another worker before the first token", ["role"], registry=r
        )
        self.resumes = Counter("pdcluster_router_resumes", "Streams resumed on another decode worker mid-generation", registry=r)
        self.picks = Counter("pdcluster_router_worker_picks", "Workers chosen per request", ["role", "worker_id"], registry=r)
        self.bypass = Counter("pdcluster_router_prefill_bypass", "Requests run on a decode worker alone", ["reason"], registry=r)
        self.kv_incompatible = Counter(
            "pdcluster_router_kv_incompatible",
            "Requests whose decode worker could not take a prefill worker's KV (another model, dtype, block size, "
            "TP, speculative config or version), by the first field that differs; the prompt went elsewhere",
            ["field"],
            registry=r,
        )
        self.response_cache = Counter(
            "pdcluster_router_response_cache",
            "Deterministic requests asked of the response cache (hit, miss) and answers stored",
            ["outcome"],
            registry=r,
        )
        self.sessions = Counter(
            "pdcluster_router_session_turns",
            "Turns of conversations with a session id: on their last turn's decode worker (kept), moved off a saturated "
            "or gone one (moved), or the first this router saw (new)",
            ["outcome"],
            registry=r,
        )
        self.placements = Counter(
            "pdcluster_router_placements",
            "Where prompts were computed (remote: a prefill worker; local: the decode worker), what decided "
            "(prediction, default, or a rule), and whether the choice was predicted to keep the SLOs",
            ["placement", "basis", "predicted_slos"],
            registry=r,
        )
        self.ttft_prediction_ratio = Histogram(
            "pdcluster_router_ttft_prediction_ratio",
            "Observed / predicted TTFT of prompts placed by prediction (from the placement decision)",
            ["placement"],
            registry=r,
            buckets=(0.25, 0.5, 0.67, 0.8, 0.9, 1.1, 1.25, 1.5, 2, 4, 8),
        )
        self.ttft_prediction_error = Histogram(
            "pdcluster_router_ttft_prediction_error_seconds",
            "|observed - predicted| TTFT of prompts placed by prediction",
            ["placement"],
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.prefix_hit_tokens = Counter(
            "pdcluster_router_prefix_hit_tokens", "Prompt tokens routed to a prefill worker expected to hold them", registry=r
        )
        self.peer_pulls = Counter(
            "pdcluster_router_peer_pulls",
            "Prompts whose prefill worker pulls a prefix from a peer, by the peer's role",
            ["peer_role"],
            registry=r,
        )
        self.peer_pull_tokens = Counter(
            "pdcluster_router_peer_pull_tokens", "Prompt tokens prefill workers pull from peers instead of computing them", registry=r
        )
        self.prompt_tokens = Counter("pdcluster_router_prompt_tokens", "Prompt tokens received", registry=r)
        self.output_tokens = Counter("pdcluster_router_output_tokens", "Tokens streamed to clients", registry=r)
        r.register(_PoolCollector(pool))
        # Export every known series from the start, so dashboards and alerts see zeros, not gaps.
        for outcome in ("ok", "invalid", "unavailable", "cancelled", "error"):
            self.requests.labels(outcome)
        for role in ROLES:
            self.retries.labels(role)
        for reason in ("short_prompt", "no_prefill_worker", "kv_incompatible", "prefill_backlog", "predicted"):
            self.bypass.labels(reason)
        for role in ROLES:
            self.peer_pulls.labels(role)
        for placement in ("remote", "local"):
            self.ttft_prediction_ratio.labels(placement)
            self.ttft_prediction_error.labels(placement)


class _PoolCollector:
    """Workers as the router sees them, read from the latest Stats poll at scrape time."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self):
        healthy = GaugeMetricFamily("pdcluster_router_healthy_workers", "Healthy workers per pool", labels=["role"])
        for role in ROLES:
            healthy.add_metric([role], len(self._pool.healthy(role)))
        yield healthy
        labels = ["role", "worker_id"]
        usage = GaugeMetricFamily("pdcluster_cluster_kv_cache_usage", "KV blocks in use / total per worker", labels=labels)
        sent = CounterMetricFamily("pdcluster_cluster_kv_bytes_sent", "KV bytes sent per worker", labels=labels)
        received = CounterMetricFamily("pdcluster_cluster_kv_bytes_received", "KV bytes received per worker", labels=labels)
        for w in self._pool.workers():
            if w.stats is None:
                continue
            values = [w.role, w.worker_id]
            usage.add_metric(values, kv_cache_usage(w.stats))
            sent.add_metric(values, w.stats.kv_bytes_sent)
            received.add_metric(values, w.stats.kv_bytes_received)
        yield from (usage, sent, received)
