"""A request's figures under vLLM's metric names, labels and buckets (`vllm:time_to_first_token_seconds`,
`vllm:e2e_request_latency_seconds`, `vllm:request_success_total`, ...), as `vllm serve` exports
them, so vLLM's dashboards, alerts and autoscaling rules read the cluster unchanged.

The router sees each request whole, so it records them: vLLM's own PrometheusStatLogger, fed
what the router observes (arrival, admission, each token, the finish), in a registry of its
own whose request half the router exports. The engine half comes from the workers."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdcluster.common.vllm_metrics import VllmMetricsView, is_request_metric

_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


class VllmRequestMetrics:
    def __init__(self, vllm_config) -> None:
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        self.registry = CollectorRegistry()
        logger_cls = _in_registry(PrometheusStatLogger, self.registry)
        for part in ("_spec_decoding_cls", "_kv_connector_cls", "_ec_connector_cls", "_perf_metrics_cls"):
            setattr(logger_cls, part, _in_registry(getattr(PrometheusStatLogger, part), self.registry))
        self._logger = logger_cls(vllm_config)

    def collector(self) -> VllmMetricsView:
        return VllmMetricsView(self.registry, is_request_metric)

    def request(self, n: int) -> None:
        """A request's `n`, once for all its samples."""
        stats = _iteration()
        stats.n_params_iter.append(n)
        self.record(stats)

    def timeline(self, prompt_tokens: int, arrived: float) -> RequestTimeline:
        """`arrived`: time.monotonic() when the request reached the router."""
        return RequestTimeline(self, prompt_tokens, arrived)

    def record(self, stats) -> None:
        self._logger.record(None, stats)


def _in_registry(cls: type, registry: CollectorRegistry) -> type:
    """`cls` with its metrics made in `registry`, not the process's default one (as vLLM's
    Ray wrappers swap the metric classes)."""
    kinds = {"_gauge_cls": Gauge, "_counter_cls": Counter, "_histogram_cls": Histogram}
    return type(cls.__name__, (cls,), {name: staticmethod(functools.partial(kind, registry=registry)) for name, kind in kinds.items()})


def _iteration():
    from vllm.v1.metrics.stats import IterationStats

    return IterationStats()


@dataclass
class RequestTimeline:
    """One sample's times as vLLM's engine keeps them: queued from arrival to admission,
    prefill from admission to the first token, decode from the first token to the last."""

    metrics: VllmRequestMetrics
    prompt_tokens: int
    arrived: float
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0

    def admit(self) -> None:
        self.admitted = time.monotonic()

    def tokens(self, count: int, cached_tokens: int, now: float) -> None:
        """`count` tokens streamed at `now` (time.monotonic())."""
        stats = _iteration()
        stats.num_generation_tokens = count
        if self.first_token is None:
            self.first_token = now
            stats.time_to_first_tokens_iter.append(now - self.arrived)
            _count_prompt(stats, self.prompt_tokens, cached_tokens)
        else:
            stats.inter_token_latencies_iter.append(now - (self.last_token or now))
        self.last_token = now
        self.generated += count
        self.metrics.record(stats)

    def finish(self, reason: str, cached_tokens: int, max_tokens: int | None) -> None:
        """`reason`: vLLM's finish reason (stop, length, abort, error)."""
        from vllm.v1.engine import FinishReason
        from vllm.v1.metrics.stats import FinishedRequestStats

        now = time.monotonic()
        admitted = self.admitted or now
        first = self.first_token or now
        last = self.last_token or now
        decode = max(last - first, 0.0)
        stats = _iteration()
        stats.finished_requests.append(
            FinishedRequestStats(
                finish_reason=FinishReason[reason.upper()] if reason in _FINISH_REASONS else FinishReason.ERROR,
                e2e_latency=now - self.arrived,
                num_prompt_tokens=self.prompt_tokens,
                num_generation_tokens=self.generated,
                max_tokens_param=max_tokens,
                queued_time=admitted - self.arrived,
                prefill_time=first - admitted,
                inference_time=last - admitted,
                decode_time=decode,
                mean_time_per_output_token=decode / (self.generated - 1) if self.generated > 1 else 0.0,
                num_cached_tokens=cached_tokens,
            )
        )
        stats.max_num_generation_tokens_iter.append(self.generated)
        self.metrics.record(stats)


def _count_prompt(stats, prompt_tokens: int, cached_tokens: int) -> None:
    """The prompt's tokens, counted when its first token comes, as vLLM counts them."""
    counted = stats.prompt_token_stats
    counted.total = prompt_tokens
    counted.cached_tokens = counted.local_cache_hit = min(cached_tokens, prompt_tokens)
    counted.computed = prompt_tokens - counted.cached_tokens
