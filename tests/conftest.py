"""Fixtures shared by every test layer: the tiny model and its tokenizer."""

from __future__ import annotations

import pytest

from pdcluster.common.tiny_model.generate import ensure_tiny_model


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
