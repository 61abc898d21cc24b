"""The worker's Prometheus metrics: engine scheduler state and KV transfer counters, read at
scrape time from the host's latest stats, and the engine's own `vllm:*` metrics (its queue, KV
cache, prefix cache, preemptions) labelled with the worker's role and id."""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdcluster.common.vllm_metrics import VllmMetricsView, is_engine_metric


class WorkerCollector:
    """Prometheus view of the worker; read at scrape time from the latest stats."""

    def __init__(self, host) -> None:
        self._host = host

    def collect(self):
        host = self._host
        labels = ["role", "worker_id"]
        values = [host.config.role, host.worker_id]
        sched = host._scheduler_stats.get("scheduler")
        kv = host._kv_stats
        gauges = {
            "pdcluster_worker_running_requests": sched.num_running_reqs if sched else 0,
            "pdcluster_worker_queued_requests": sched.num_waiting_reqs if sched else 0,
            "pdcluster_worker_kv_cache_usage": sched.kv_cache_usage if sched else 0.0,
            "pdcluster_worker_active_rpcs": host._active,
            "pdcluster_worker_draining": int(host._draining),
            "pdcluster_kv_pending_sends": kv.pending_sends,
            "pdcluster_kv_pending_receives": kv.pending_receives,
            "pdcluster_kv_staged_bytes": kv.staged_bytes,
            # What routers are told this worker's prefix cache holds.
            "pdcluster_worker_prefix_cache_blocks": len(host.prefix_cache.names) if host.prefix_cache else 0,
        }
        counters = {
            "pdcluster_kv_bytes_sent": kv.bytes_sent,
            "pdcluster_kv_bytes_received": kv.bytes_received,
            "pdcluster_kv_send_seconds": kv.send_seconds,
            "pdcluster_kv_receive_seconds": kv.receive_seconds,
            "pdcluster_kv_transfers_sent": kv.transfers_sent,
            "pdcluster_kv_transfers_received": kv.transfers_received,
            "pdcluster_kv_transfers_failed": kv.transfers_failed,
            "pdcluster_kv_checksum_failures": kv.checksum_failures,
            "pdcluster_kv_send_retries": kv.send_retries,
            "pdcluster_kv_recomputes": kv.recomputes,
            "pdcluster_kv_expired_leases": kv.expired_leases,
            "pdcluster_kv_tier_blocks_stored": kv.tier_blocks_stored,
            "pdcluster_kv_tier_blocks_loaded": kv.tier_blocks_loaded,
            "pdcluster_kv_tier_checksum_failures": kv.tier_checksum_failures,
            "pdcluster_worker_kv_event_batches_missed": host.prefix_cache.missed_batches if host.prefix_cache else 0,
        }
        for family, metrics in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, value in metrics.items():
                metric = family(name, name.replace("_", " "), labels=labels)
                metric.add_metric(values, value)
                yield metric
        by_transport = CounterMetricFamily(
            "pdcluster_kv_bytes",
            "KV bytes moved, by direction and the data path each transfer used",
            labels=[*labels, "direction", "transport"],
        )
        for direction, moved in (("sent", kv.bytes_sent_by_transport), ("received", kv.bytes_received_by_transport)):
            for transport, nbytes in moved.items():
                by_transport.add_metric([*values, direction, transport], nbytes)
        yield by_transport
        # vLLM's stat logger records into the process's default registry.
        yield from VllmMetricsView(REGISTRY, is_engine_metric, dict(zip(labels, values, strict=True))).collect()


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:
        """A scrape every few seconds is not news."""


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve `registry` at http://host:port/metrics in Prometheus's text format, as vLLM's own
    /metrics does; returns the port. prometheus_client's OpenMetrics output, which Prometheus
    asks for first, writes the colon of each `vllm:` sample name as an underscore, where vLLM's
    dashboards would find nothing."""
    app = make_wsgi_app(registry)

    def text_format(environ, start_response):
        environ["HTTP_ACCEPT"] = "text/plain; version=0.0.4"
        return app(environ, start_response)

    server = make_server(host, port, text_format, _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server.server_port
