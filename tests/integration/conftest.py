"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from pdcluster.bench.trace_receiver import TraceReceiver

from tests.support.processes import running_pair
from tests.support.vllm_reference import ENGINE_FLAGS, LORA_FLAGS


@pytest.fixture(scope="package")
def traces():
    """An OTLP receiver the shared pair's engines (and the routers that ask) export spans to."""
    receiver = TraceReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="package")
def shared_worker_args(traces) -> list[str]:
    """The shared pair's worker flags: the reference's engine flags (float32, LoRA on), tracing."""
    return [*ENGINE_FLAGS, *LORA_FLAGS, "--otlp-traces-endpoint", traces.endpoint]


@pytest.fixture(scope="package")
def shared_pair(shared_worker_args):
    """One prefill and one decode worker on the tiny model, for the modules that put routers of
    their own in front of plain workers (test_prefix_cache_events, test_router_api,
    test_vllm_parity): one engine pair's start, not one each. A test reads the workers' state
    as differences, since another module may have used them before."""
    with running_pair(shared_worker_args, shared_worker_args) as pair:
        yield pair
