"""Fixtures shared by every test layer: the tiny model, and a real prefill/decode worker pair."""

from __future__ import annotations

import pytest

from pdcluster.common.ports import free_port
from pdcluster.common.tiny_model.generate import ensure_tiny_model

from tests.support.processes import running_pair
from tests.support.tcp_proxy import CorruptingProxy
from tests.support.worker_calls import KV_CHUNK_BYTES, KV_LOAD_TIMEOUT_S


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def kv_data_proxy():
    """Sits in front of the decode worker's KV data channel; tests arm it to corrupt."""
    port = free_port()
    proxy = CorruptingProxy(f"127.0.0.1:{port}")
    proxy.upstream_port = port
    yield proxy
    proxy.close()


@pytest.fixture(scope="module", params=["tcp", "nixl"])  # torn down before another module starts its engines
def pd_pair(request, model_dir, kv_data_proxy):
    """One prefill and one decode worker process on the tiny model, moving KV over each data path."""
    args = ["--kv-transport", request.param, "--kv-chunk-bytes", str(KV_CHUNK_BYTES), "--kv-load-timeout", str(KV_LOAD_TIMEOUT_S)]
    decode_args = ["--kv-data-port", str(kv_data_proxy.upstream_port), "--kv-data-advertise", kv_data_proxy.address]
    with running_pair(args, args + decode_args, compiled=True) as pair:
        yield pair
