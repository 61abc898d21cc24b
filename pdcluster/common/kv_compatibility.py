"""What must match between two workers for one to take the other's KV cache: on many hosts
pools drift (another model revision, dtype, block size, TP, speculative config, pdcluster or
vLLM version), and KV from a peer that differs decodes into wrong text without an error (as
peers found: vllm#49230, #50620). Each worker states its own at start; the router pairs a
prefill worker with a decode worker only where every field matches, and otherwise has the
decode worker compute the prompt itself."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

_SAMPLE_BYTES = 1 << 20  # of each weight file, from its start and its end: cheap, and tells checkpoints apart


def kv_compatibility(vllm_config) -> dict[str, str]:
    """The fields of a running engine's config (vLLM's VllmConfig) that its KV depends on."""
    model, cache, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    spec = vllm_config.speculative_config
    return {
        "weights": weights_digest(model.model),
        "revision": str(model.revision or ""),
        "dtype": str(model.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(cache.cache_dtype),
        "block_size": str(cache.block_size),
        "tensor_parallel_size": str(parallel.tensor_parallel_size),
        "speculative": f"{spec.method}:{spec.num_speculative_tokens}" if spec else "none",
        "pdcluster": version("pdcluster"),
        "vllm": version("vllm"),
    }


def weights_digest(model_dir: str) -> str:
    """A digest of a model directory's config and weights (for a hub name, the name itself):
    its config.json, and each weight file's name, size, first and last MiB."""
    root = Path(model_dir)
    if not root.is_dir():
        return model_dir
    digest = hashlib.sha256()
    config = root / "config.json"
    if config.exists():
        fields = json.loads(config.read_text())
        fields.pop("_name_or_path", None)  # where it was loaded from, not what it is
        digest.update(json.dumps(fields, sort_keys=True).encode())
    for path in sorted([*root.glob("*.safetensors"), *root.glob("*.bin")]):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_SAMPLE_BYTES))
            f.seek(max(size - _SAMPLE_BYTES, 0))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def kv_digest(fields: Mapping[str, str]) -> str:
    """One short string for all the fields, which the KV transfer carries with the KV: equal
    where the fields are."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()[:16]


def kv_mismatch(ours: Mapping[str, str], theirs: Mapping[str, str]) -> str | None:
    """The first field on which the two differ, or None where their KV fits. A worker that
    states none (an older one, or a test's fake) matches only another that states none."""
    return next((field for field in sorted({*ours, *theirs}) if ours.get(field) != theirs.get(field)), None)


def describe_mismatch(field: str, ours: Mapping[str, str], theirs: Mapping[str, str]) -> str:
    return f"{field} {ours.get(field, 'unstated')} != {theirs.get(field, 'unstated')}"
