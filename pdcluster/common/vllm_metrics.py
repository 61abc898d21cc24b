"""vLLM's own metrics (`vllm:*`) in a cluster, split where each is seen whole: a request's
latencies and token counts at the router, which sees it from arrival to last token; an
engine's queue, KV cache and prefix cache at each worker. A prefill worker's own "TTFT" is
not a request's, so the workers never export the request half."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

# The families vLLM records per request (vllm/v1/metrics/loggers.py), under their declared
# names (counters without `_total`). Every other `vllm:` family is the engine's.
REQUEST_METRICS = frozenset(
    {
        "vllm:prompt_tokens",
        "vllm:prompt_tokens_by_source",
        "vllm:prompt_tokens_cached",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:request_max_num_generation_tokens",
        "vllm:request_params_n",
        "vllm:request_params_max_tokens",
        "vllm:request_prefill_kv_computed_tokens",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    }
)


def is_request_metric(name: str) -> bool:
    return name in REQUEST_METRICS


def is_engine_metric(name: str) -> bool:
    return name not in REQUEST_METRICS


class VllmMetricsView:
    """A Prometheus collector: the `vllm:` families of `registry` that `keep` accepts, each
    series with `labels` added (a worker's role, for instance; vLLM's queries sum or filter by
    `model_name` and are unchanged by an extra label)."""

    def __init__(self, registry: CollectorRegistry, keep: Callable[[str], bool], labels: dict[str, str] | None = None) -> None:
        self._registry = registry
        self._keep = keep
        self._labels = labels or {}

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if not family.name.startswith("vllm:") or not self._keep(family.name):
                continue
            view = Metric(family.name, family.documentation, family.type, family.unit)
            view.samples = [s._replace(labels={**s.labels, **self._labels}) for s in family.samples]
            yield view
