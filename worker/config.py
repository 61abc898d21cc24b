"""Typed configuration of one worker process (engine + KV endpoint + servers).

A worker gets it whole: `--config-json` carries the WorkerConfig the controller built from
the cluster spec, and flags (derived from these models) override single fields on top.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationInfo, model_serializer, model_validator

from pdcluster.common.config_flags import add_model_flags, env_values, flag_values, merged
from pdcluster.common.processes import ROLE_SWITCHING
from pdcluster.common.tls import TLSFiles
from pdcluster.common.vllm_args import check_engine_args, engine_args_from_flags
from pdcluster.common.worker_record import Role
from pdcluster.kv_transfer.settings import KVTransferSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a spec or config is an error, not a default


# Validation context: the engine arguments were checked where the config was made (checking
# imports vLLM, seconds that a replica's start would otherwise wait for).
ENGINE_ARGS_CHECKED = "engine_args_checked"


class EngineConfig(BaseModel):
    """The engine: the model, the CPU KV cache size (pdcluster's), and any other vLLM engine
    argument under its own name (`dtype`, `max_model_len`, `quantization`,
    `gpu_memory_utilization`, `speculative_config`, ...), handed to vLLM as given. A key that is
    not one is refused by name, and vLLM checks the values, when the config loads."""

    model_config = ConfigDict(extra="allow")

    model: str = Field("", description="HF model directory (default: the tiny generated model)")
    kv_cache_gib: float = Field(
        1.0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE); or give vLLM's kv_cache_memory_bytes instead, not both"
    )

    @model_validator(mode="after")
    def _vllm_checks(self, info: ValidationInfo):
        if not (info.context or {}).get(ENGINE_ARGS_CHECKED):
            check_engine_args(self.vllm_args)
        backend = self.vllm_args.get("kv_offloading_backend", "native")
        if backend != "native":
            raise ValueError(f"--kv-offloading-backend {backend}: pdcluster's workers keep offloaded KV themselves (native only)")
        if "kv_cache_gib" in self.model_fields_set and "kv_cache_memory_bytes" in self.vllm_args:
            raise ValueError("the KV cache size is given twice, as kv_cache_gib (pdcluster's) and kv_cache_memory_bytes (vLLM's): give one")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # kv_cache_gib left to its default stays unset where the dump is read back (a worker's
        # --config-json), so that beside kv_cache_memory_bytes it is not taken as given twice.
        data = handler(self)
        if "kv_cache_gib" not in self.model_fields_set:
            data.pop("kv_cache_gib", None)
        return data

    @property
    def vllm_args(self) -> dict[str, Any]:
        """The vLLM engine arguments set here, besides the model."""
        return dict(self.model_extra or {})


class WorkerConfig(_Strict):
    role: Role
    worker_id: str = ""
    host: str = Field("127.0.0.1", description="address its servers bind and advertise (empty in a spec: the Ray node's)")
    port: int = Field(0, description="Worker gRPC port (0: any free port)")
    metrics_port: int = 0
    auth_token: str = Field("", description="the cluster's shared KV transfer secret", json_schema_extra={"env": "PDCLUSTER_KV_TOKEN"})
    kv: KVTransferSettings = Field(default_factory=KVTransferSettings, description="KV transfer (flags: --kv-*)")
    ready_file: str = Field("", description="written (the WorkerRecord, JSON) once the worker serves")
    registry: str = Field("", description="redis://HOST:PORT/DB: announce this worker there")
    tls: TLSFiles = Field(default_factory=TLSFiles, description="on the Worker service, the KV endpoint and the data channel")
    cluster_name: str = "pdcluster"
    role_switching: bool = Field(
        False,
        description="start able to serve either role (its engine both produces and consumes KV), so the controller "
        "can move it between pools (`python -m pdcluster.role_switching_worker`)",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, json_schema_extra={"flag_prefix": ""})


def parse_worker_config(role: Role, argv: list[str] | None = None) -> WorkerConfig:
    """`python -m pdcluster.{role}_worker [--config-json JSON] [flags]`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m pdcluster.{role}_worker",
        description=f"pdcluster {role} worker; any other flag is one of vLLM's engine arguments (`vllm serve --help`)",
        allow_abbrev=False,  # a vLLM flag must never be taken for a prefix of one of ours
    )
    parser.add_argument("--config-json", default="", help="the whole WorkerConfig as JSON; flags override its fields")
    add_model_flags(parser, WorkerConfig, exclude=("role",))
    args, rest = parser.parse_known_args(argv)
    engine_args, unknown = engine_args_from_flags(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    base = json.loads(args.config_json) if args.config_json else {}
    del args.config_json
    flags = merged(flag_values(args), {"role": role, "engine": engine_args})
    return WorkerConfig.model_validate(merged(merged(env_values(WorkerConfig), base), flags))


def worker_args(config: WorkerConfig) -> list[str]:
    """The command-line arguments that hand `config` to a worker process whole."""
    return [*(["--role", config.role] if config.role_switching else []), "--config-json", config.model_dump_json()]


def worker_process_kind(config: WorkerConfig) -> str:
    """Which process `start_process` runs for it: its role's, or the one hosting both roles."""
    return ROLE_SWITCHING if config.role_switching else config.role
