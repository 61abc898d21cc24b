"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.support.vllm_reference import running_vllm_reference


@pytest.fixture(scope="package")
def vllm_reference(model_dir, tmp_path_factory):
    """vLLM's own server on the tiny model, float32: one for every integration module, stopped
    before the cluster tests start theirs."""
    with running_vllm_reference(model_dir, tmp_path_factory.mktemp("vllm-reference")) as reference:
        yield reference
