"""Typed configuration of the router, from CLI flags (and, through the cluster spec, YAML)."""

from __future__ import annotations

import argparse
import os

from pydantic import BaseModel, Field

from cluster.worker_config import add_tls_flags, tls_from
from kv_transfer.tls import TLSFiles


class RouterConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000  # OpenAI HTTP API; 0 picks a free port
    grpc_port: int = 50051  # pdcluster.v1.Inference; 0 picks a free port
    model: str = ""  # tokenizer/model directory; empty: the tiny generated model
    served_model_name: str = ""  # the `model` clients send; empty: the directory's name
    workers: list[str] = Field(default_factory=list)  # Worker gRPC addresses (host:port)
    registry: str = ""  # redis://...: follow the workers announced there instead of `workers`
    cluster_name: str = "pdcluster"
    tls: TLSFiles = TLSFiles()  # HTTPS, the Inference service, and the channels to workers (mTLS with a CA)
    api_key: str = ""  # empty: no auth
    bypass_prefill_below_tokens: int = 64  # shorter prompts run on the decode worker alone
    # Prefill on the decode worker when the chosen prefill worker has more prompt tokens than
    # this queued: better TTFT under a prefill backlog, at some ITL cost. 0: never.
    local_prefill_above_queued_tokens: int = 0
    max_inflight: int = 256  # requests running at once
    max_queue: int = 512  # requests waiting for a slot; past it: 429
    max_body_bytes: int = 4 << 20
    max_n: int = 16
    max_attempts: int = 4  # tries per request across workers (prefill retries, decode resumes)
    prefill_timeout_s: float = 300.0
    decode_idle_timeout_s: float = 300.0  # longest silence on a token stream before failover
    capacity_wait_s: float = 120.0  # how long a request waits for a healthy decode worker (one restarting)
    health_interval_s: float = 1.0
    prefix_index_blocks: int = 65536  # block hashes remembered per prefill worker
    ready_file: str = ""


def add_router_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="OpenAI HTTP port (0: any free port)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC Inference port (0: any free port)")
    parser.add_argument("--model", default="", help="HF model directory (default: the tiny generated model)")
    parser.add_argument("--served-model-name", default="")
    parser.add_argument("--api-key", default=os.environ.get("PDCLUSTER_API_KEY", ""),
                        help="require `Authorization: Bearer KEY` (env PDCLUSTER_API_KEY)")
    parser.add_argument("--bypass-prefill-below", type=int, default=64,
                        help="prompts shorter than this many tokens skip remote prefill")
    parser.add_argument("--local-prefill-above-queued", type=int, default=0,
                        help="run a prompt on the decode worker when the best prefill worker already has more than "
                             "this many prompt tokens queued (trades ITL for TTFT under a prefill backlog; 0: never)")
    parser.add_argument("--max-inflight", type=int, default=256)
    parser.add_argument("--max-queue", type=int, default=512)
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20)
    add_tls_flags(parser)


def router_config_from(args: argparse.Namespace, **extra) -> RouterConfig:
    return RouterConfig(
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        model=args.model,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        bypass_prefill_below_tokens=args.bypass_prefill_below,
        local_prefill_above_queued_tokens=args.local_prefill_above_queued,
        max_inflight=args.max_inflight,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        tls=tls_from(args),
        **extra,
    )


def parse_router_args(argv: list[str] | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser(prog="python -m router", description="pdcluster router")
    add_router_flags(parser)
    parser.add_argument("--worker", action="append", default=[], help="Worker gRPC address; repeat per worker")
    parser.add_argument("--registry", default="", help="redis://HOST:PORT/DB: follow the workers announced there")
    parser.add_argument("--cluster-name", default="pdcluster")
    parser.add_argument("--ready-file", default="")
    args = parser.parse_args(argv)
    return router_config_from(
        args, workers=args.worker, ready_file=args.ready_file, registry=args.registry, cluster_name=args.cluster_name
    )
