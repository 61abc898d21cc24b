"""Shared fixtures: the tiny model, real worker processes, the single-engine reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.local_launcher import start_worker, wait_ready
from cluster.tiny_model.generate import ensure_tiny_model

# Small chunks so most test prompts span several chunks per layer.
KV_CHUNK_BYTES = 64 * 1024
KV_LOAD_TIMEOUT_S = 20


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def pd_pair(model_dir):
    """One prefill and one decode worker process on the tiny model."""
    args = ["--kv-chunk-bytes", str(KV_CHUNK_BYTES), "--kv-load-timeout", str(KV_LOAD_TIMEOUT_S)]
    workers = [start_worker("prefill", args), start_worker("decode", args)]
    try:
        for w in workers:
            wait_ready(w)
        yield tuple(workers)
    finally:
        for w in workers:
            w.stop()


def reference_outputs(prompts: list[list[int]], max_tokens: int, tmp_path) -> list[list[int]]:
    prompts_path, out_path = tmp_path / "prompts.json", tmp_path / "outputs.json"
    prompts_path.write_text(json.dumps(prompts))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, "-m", "tests.reference_engine", str(prompts_path), str(out_path), str(max_tokens)],
        cwd=root, check=True, timeout=600, stdout=subprocess.DEVNULL,
    )
    return json.loads(out_path.read_text())
