"""Typed configuration of one worker process (engine + KV endpoint + servers).

A worker gets it whole: `--config-json` carries the WorkerConfig the controller built from
the cluster spec, and flags (derived from these models) override single fields on top.
"""

from __future__ import annotations

import argparse
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pdcluster.common.config_flags import add_model_flags, env_values, flag_values, merged
from pdcluster.common.tls import TLSFiles
from pdcluster.common.worker_record import Role

KVTransport = Literal["tcp", "grpc"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a spec or config is an error, not a default


class EngineConfig(_Strict):
    model: str = Field("", description="HF model directory (default: the tiny generated model)")
    dtype: str = "auto"
    max_model_len: int = 4096
    kv_cache_gib: float = Field(1.0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)")
    max_num_seqs: int = 64
    max_num_batched_tokens: int = Field(0, description="tokens per engine step (0: vLLM's default)")
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85


class WorkerConfig(_Strict):
    role: Role
    worker_id: str = ""
    host: str = Field("127.0.0.1", description="address its servers bind and advertise (empty in a spec: the Ray node's)")
    port: int = Field(0, description="Worker gRPC port (0: any free port)")
    kv_port: int = 0
    metrics_port: int = 0
    auth_token: str = Field("", description="the cluster's shared KV transfer secret", json_schema_extra={"env": "PDCLUSTER_KV_TOKEN"})
    kv_transport: KVTransport = Field("tcp", description="KV data path: raw TCP negotiated over gRPC (tcp), or gRPC streams (grpc)")
    kv_data_port: int = 0
    kv_data_advertise: str = Field("", description="host:port producers dial for KV data")
    kv_chunk_bytes: int = Field(4 << 20, description="4 MiB suits tcp, 1 MiB grpc")
    kv_load_timeout_s: float = Field(60.0, json_schema_extra={"flag": "--kv-load-timeout"})
    kv_send_timeout_s: float = Field(60.0, json_schema_extra={"flag": "--kv-send-timeout"})
    ready_file: str = Field("", description="written (the WorkerRecord, JSON) once the worker serves")
    registry: str = Field("", description="redis://HOST:PORT/DB: announce this worker there")
    tls: TLSFiles = Field(default_factory=TLSFiles, description="on the Worker service, the KV endpoint and the data channel")
    cluster_name: str = "pdcluster"
    engine: EngineConfig = Field(default_factory=EngineConfig, json_schema_extra={"flag_prefix": ""})


def parse_worker_config(role: Role, argv: list[str] | None = None) -> WorkerConfig:
    """`python -m pdcluster.{role}_worker [--config-json JSON] [flags]`."""
    parser = argparse.ArgumentParser(prog=f"python -m pdcluster.{role}_worker", description=f"pdcluster {role} worker")
    parser.add_argument("--config-json", default="", help="the whole WorkerConfig as JSON; flags override its fields")
    add_model_flags(parser, WorkerConfig, exclude=("role",))
    args = parser.parse_args(argv)
    base = json.loads(args.config_json) if args.config_json else {}
    del args.config_json
    return WorkerConfig.model_validate(merged(merged(env_values(WorkerConfig), base), {**flag_values(args), "role": role}))


def worker_args(config: WorkerConfig) -> list[str]:
    """The command-line arguments that hand `config` to a worker process whole."""
    return ["--config-json", config.model_dump_json()]
