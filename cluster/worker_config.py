"""Typed configuration of one worker process (engine + KV endpoint + servers), from CLI."""

from __future__ import annotations

import argparse
import os
from typing import Literal

from pydantic import BaseModel, Field

from kv_transfer.tls import TLSFiles

Role = Literal["prefill", "decode"]


class EngineConfig(BaseModel):
    model: str = ""  # empty: the tiny generated model
    dtype: str = "auto"
    max_model_len: int = 4096
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 0  # tokens per engine step; 0: vLLM's default
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85


class WorkerConfig(BaseModel):
    role: Role
    worker_id: str = ""
    host: str = "127.0.0.1"
    port: int = 0  # Worker gRPC service; 0 picks a free port
    kv_port: int = 0
    metrics_port: int = 0
    auth_token: str = ""
    kv_transport: str = "tcp"
    kv_data_port: int = 0
    kv_data_advertise: str = ""
    kv_chunk_bytes: int = 4 << 20
    kv_load_timeout_s: float = 60.0
    kv_send_timeout_s: float = 60.0
    ready_file: str = ""  # written (JSON with ports) once the worker serves
    registry: str = ""  # redis://...: heartbeat this worker's record there (TTL)
    tls: TLSFiles = TLSFiles()  # on the Worker service, the KV endpoint and the data channel
    cluster_name: str = "pdcluster"
    engine: EngineConfig = Field(default_factory=EngineConfig)


def parse_worker_args(role: Role, argv: list[str] | None = None) -> WorkerConfig:
    parser = argparse.ArgumentParser(prog=f"python -m {role}_worker", description=f"pdcluster {role} worker")
    parser.add_argument("--model", default="", help="HF model directory (default: the tiny generated model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=0, help="tokens per engine step (0: vLLM's default)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--worker-id", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kv-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--auth-token", default=os.environ.get("PDCLUSTER_KV_TOKEN", ""),
                        help="the cluster's shared KV transfer secret (env PDCLUSTER_KV_TOKEN)")
    parser.add_argument("--kv-transport", choices=["tcp", "grpc"], default="tcp",
                        help="KV data path: raw TCP negotiated over gRPC, or gRPC streams")
    parser.add_argument("--kv-data-port", type=int, default=0)
    parser.add_argument("--kv-data-advertise", default="", help="host:port producers dial for KV data")
    parser.add_argument("--kv-chunk-bytes", type=int, default=4 << 20, help="4 MiB suits tcp, 1 MiB grpc")
    parser.add_argument("--kv-load-timeout", type=float, default=60.0)
    parser.add_argument("--kv-send-timeout", type=float, default=60.0)
    parser.add_argument("--ready-file", default="")
    parser.add_argument("--registry", default="", help="redis://HOST:PORT/DB: announce this worker there")
    parser.add_argument("--cluster-name", default="pdcluster")
    add_tls_flags(parser)
    a = parser.parse_args(argv)
    return WorkerConfig(
        role=role,
        worker_id=a.worker_id,
        host=a.host,
        port=a.port,
        kv_port=a.kv_port,
        metrics_port=a.metrics_port,
        auth_token=a.auth_token,
        kv_transport=a.kv_transport,
        kv_data_port=a.kv_data_port,
        kv_data_advertise=a.kv_data_advertise,
        kv_chunk_bytes=a.kv_chunk_bytes,
        kv_load_timeout_s=a.kv_load_timeout,
        kv_send_timeout_s=a.kv_send_timeout,
        ready_file=a.ready_file,
        registry=a.registry,
        cluster_name=a.cluster_name,
        tls=tls_from(a),
        engine=EngineConfig(
            model=a.model,
            dtype=a.dtype,
            max_model_len=a.max_model_len,
            kv_cache_gib=a.kv_cache_gib,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            enable_prefix_caching=not a.no_prefix_caching,
            tensor_parallel_size=a.tensor_parallel_size,
        ),
    )


def engine_flags(engine: EngineConfig) -> list[str]:
    """The worker CLI flags that reproduce `engine` (for launching workers from a spec)."""
    flags = [
        "--dtype", engine.dtype,
        "--max-model-len", str(engine.max_model_len),
        "--kv-cache-gib", str(engine.kv_cache_gib),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--max-num-batched-tokens", str(engine.max_num_batched_tokens),
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
    ]
    if engine.model:
        flags += ["--model", engine.model]
    if not engine.enable_prefix_caching:
        flags.append("--no-prefix-caching")
    return flags


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", default="", help="PEM certificate: serve and connect over TLS")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle: peers must present a certificate it signed (mTLS)")


def tls_from(args: argparse.Namespace) -> TLSFiles:
    return TLSFiles(args.tls_cert, args.tls_key, args.tls_ca)


def tls_flags(tls: TLSFiles) -> list[str]:
    return ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca] if tls.enabled else []
