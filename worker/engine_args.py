"""vLLM engine arguments for a pdcluster engine, with or without our KV connector."""

from __future__ import annotations

import os
from typing import Any

from pdcluster.common.vllm_args import PDCLUSTER_DEFAULTS
from pdcluster.worker.config import EngineConfig


def resolve_model(model: str) -> str:
    if model:
        return model
    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    return str(ensure_tiny_model())


def engine_environment(engine: EngineConfig) -> dict[str, str]:
    """Environment vLLM reads at engine start (CPU KV size must be explicit here)."""
    env = {}
    if "kv_cache_memory_bytes" not in engine.vllm_args:
        # vLLM's own `--kv-cache-memory-bytes` sizes the cache where given: on CPU this variable
        # would override it.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(engine.kv_cache_gib)))
    if not _has_gpu() and engine.vllm_args.get("tensor_parallel_size", 1) == 1:
        # AsyncLLM keeps its engine core in its own process either way; this only runs
        # the CPU model inside that process instead of a further worker process whose
        # shared-memory queue busy-spins and starves the other pool on small machines.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def prepare_environment(engine: EngineConfig) -> None:
    """Apply `engine_environment`, leaving what the caller already set."""
    for name, value in engine_environment(engine).items():
        os.environ.setdefault(name, value)


def engine_kwargs(engine: EngineConfig, kv_transfer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for vLLM's (Async)EngineArgs / LLM: every engine argument given, over
    pdcluster's defaults."""
    kwargs: dict[str, Any] = {**PDCLUSTER_DEFAULTS, **engine.vllm_args, "model": resolve_model(engine.model)}
    if not engine.model and kwargs.get("dtype", "auto") == "auto":
        kwargs["dtype"] = "float32"  # the tiny model is float32 so greedy output is stable; "auto" could pick bf16
    if kv_transfer is not None:
        from vllm.config import KVTransferConfig

        kv_transfer = _with_host_tier(kv_transfer, kwargs)
        kwargs["kv_transfer_config"] = KVTransferConfig(**kv_transfer)
    return kwargs


def _with_host_tier(kv_transfer: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """vLLM's offloading flags, served by our connector's host tier: vLLM would replace our
    connector with its OffloadingConnector (which has no CPU-platform worker)."""
    size = kwargs.pop("kv_offloading_size", None)
    kwargs.pop("kv_offloading_backend", None)  # "native": EngineConfig refuses others
    if size is None:
        return kv_transfer
    extra = {**kv_transfer["kv_connector_extra_config"], "tier_bytes": int(size * (1 << 30))}
    return {**kv_transfer, "kv_connector_extra_config": extra}


def pd_kv_transfer(extra: dict[str, Any]) -> dict[str, Any]:
    """KVTransferConfig fields that load our connector, ready to produce and consume KV in every
    pool (as vLLM's NIXL connector is): a worker may change role, and any worker may send a peer
    the prefix it holds, or pull one from a peer."""
    return dict(
        kv_connector="PdConnector",
        kv_connector_module_path="pdcluster.kv_transfer.connector",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
        kv_load_failure_policy="recompute",
    )


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def follow_kv_events(kwargs: dict[str, Any], socket_dir: str) -> tuple[str, str | None]:
    """Turn on vLLM's KV cache events for the prefix-cache mirror, on private IPC sockets,
    unless the engine arguments configure their own; return where to read them and where
    to ask for missed ones ("" to read nothing: theirs connect out, or publish nowhere)."""
    from vllm.config import KVEventsConfig

    given = kwargs.get("kv_events_config")
    if given is None:
        endpoint, replay = f"ipc://{socket_dir}/kv-events", f"ipc://{socket_dir}/kv-events-replay"
        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, replay_endpoint=replay)
        return endpoint, replay
    config = given if isinstance(given, KVEventsConfig) else KVEventsConfig(**given)
    if not config.enable_kv_cache_events or config.publisher != "zmq":
        return "", None
    replay = config.replay_endpoint.replace("*", "127.0.0.1") if config.replay_endpoint else None
    if "*" in config.endpoint:  # bound on every interface: this host reads it on loopback
        return config.endpoint.replace("*", "127.0.0.1"), replay
    return (config.endpoint, replay) if config.endpoint.startswith("ipc://") else ("", None)
