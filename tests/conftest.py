"""Fixtures shared by every test layer: the tiny model, its tokenizer, a private Redis."""

from __future__ import annotations

import pytest

from pdcluster.common.redis_server import start_redis
from pdcluster.common.tiny_model.generate import ensure_tiny_model


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
