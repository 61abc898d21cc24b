"""Fixtures shared by every test layer: the tiny model, its tokenizer, a private Redis, vLLM's own
server on the tiny model."""

from __future__ import annotations

import pytest

from pdcluster.common.redis_server import start_redis
from pdcluster.common.tiny_model.generate import ensure_tiny_model

from tests.support.vllm_reference import running_vllm_reference


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def redis_url():
    """A private redis-server, shared by the tests that only need one running."""
    server, url = start_redis()
    yield url
    server.kill()
    server.wait()


@pytest.fixture(scope="session")
def vllm_reference(model_dir, tmp_path_factory):
    """vLLM's own server on the tiny model, float32: one engine start for every module that
    compares with it, the cluster tests' included (idle, it costs memory, not CPU)."""
    with running_vllm_reference(model_dir, tmp_path_factory.mktemp("vllm-reference")) as reference:
        yield reference
