"""The typed cluster spec: model and engine, the two pools, router, registry, autoscaling.

Loaded in one place (`load_cluster_spec`) from an optional YAML file with CLI flags on
top; `deploy/cluster.example.yaml` shows every field.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pdcluster.common.tls import TLSFiles
from pdcluster.common.vllm_args import (
    check_engine_args,
    engine_args_from_flags,
    split_serve_command_line,
    vllm_config_flags,
    vllm_serve_args,
)
from pdcluster.common.worker_record import Role
from pdcluster.kv_transfer.settings import TRANSPORTS, KVTransferSettings
from pdcluster.router.config import PoolCosts, RouterConfig
from pdcluster.worker.config import ENGINE_ARGS_CHECKED, EngineConfig, WorkerConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in the YAML is an error, not a default


class PoolSpec(_Strict):
    replicas: int = Field(1, ge=0)  # at start; the autoscaler moves it within [min, max]
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)
    # A Ray custom resource only this pool's nodes advertise (e.g. `prefill_pool`); each
    # replica takes one unit of it, so pools land on their own node types.
    node_resource: str = ""
    kv: KVTransferSettings = Field(default_factory=KVTransferSettings)  # this pool's KV transfer settings
    cost_per_hour: float = Field(0.0, ge=0)  # USD per replica-hour: the controller's $/1M-token metrics
    # vLLM engine arguments for this pool only, over the spec's `engine:` (e.g. a prefill pool's
    # larger max_num_batched_tokens); checked by vLLM like `engine:`.
    engine: dict[str, Any] = Field(default_factory=dict)
    extra_args: list[str] = Field(default_factory=list)  # more worker CLI flags, on top of the config

    @field_validator("engine")
    @classmethod
    def _vllm_engine_args(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if not (info.context or {}).get(ENGINE_ARGS_CHECKED):
            check_engine_args(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _kv_transport_shorthand(cls, data: Any) -> Any:
        """`kv_transport: X` is short for `kv: {transport: X}`."""
        if isinstance(data, dict) and "kv_transport" in data:
            data = dict(data)
            data["kv"] = {**data.get("kv", {}), "transport": data.pop("kv_transport")}
        return data

    @model_validator(mode="after")
    def _bounds(self):
        self.max_replicas = max(self.max_replicas, self.replicas, self.min_replicas)
        self.min_replicas = min(self.min_replicas, self.replicas)
        return self

    def bundle(self) -> dict[str, float]:
        """One replica's resources, one placement-group bundle (STRICT_PACK: one node)."""
        bundle = {"CPU": self.num_cpus}
        if self.num_gpus or self.tensor_parallel_size > 1:
            bundle["GPU"] = max(self.num_gpus, float(self.tensor_parallel_size))
        if self.node_resource:
            bundle[self.node_resource] = 1.0
        return bundle


class AutoscalingSpec(_Strict):
    enabled: bool = False
    # What a pool's load is measured against. queue: the targets below. slo: the router's SLOs
    # (TTFT for prefill, ITL for decode), each replica's recent p90 latency or the latency the
    # router's profile predicts from its queue, whichever is worse (as Dynamo's SLA planner).
    signal: Literal["queue", "slo"] = "queue"
    # When one pool must grow while the other sits under its downscale threshold, move one of
    # the idle pool's ready replicas over (it drains, then serves the other role) instead of
    # starting a new one: no engine start, and a fixed set of machines follows the load's
    # prefill:decode balance. Workers then start able to serve either role.
    role_switching: bool = False
    interval_s: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(4.0, ge=0)  # over target this long before adding a replica
    downscale_delay_s: float = Field(30.0, ge=0)  # under target this long before removing one
    cooldown_s: float = Field(10.0, ge=0)  # between two decisions for one pool
    downscale_ratio: float = Field(0.5, gt=0, lt=1)  # hysteresis: remove only below ratio x target
    prefill_target_queued_tokens: int = Field(2048, ge=1)  # per replica
    decode_target_kv_usage: float = Field(0.7, gt=0, le=1)
    decode_target_running: int = Field(32, ge=1)  # requests per replica


class ModelSpec(_Strict):
    """One more model the cluster serves beside the spec's own (`engine:`, `prefill:`,
    `decode:`), with its own engine and pools. `prefill: {replicas: 0}` runs it co-located:
    its decode workers compute their own prompts."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")  # its served name, unless vllm_args give one; names its pools
    engine: EngineConfig = Field(default_factory=EngineConfig)
    prefill: PoolSpec = Field(default_factory=PoolSpec)
    decode: PoolSpec = Field(default_factory=PoolSpec)
    # Its `vllm serve` serving flags at the router (--served-model-name, --chat-template, parsers);
    # the command line's serve the spec's own model only.
    vllm_args: list[str] = Field(default_factory=list)

    def serving_flags(self) -> list[str]:
        named = any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in self.vllm_args)
        return self.vllm_args if named else ["--served-model-name", self.name, *self.vllm_args]


class ClusterSpec(_Strict):
    name: str = "pdcluster"
    ray_address: str = ""  # empty: start a local Ray instance
    # Where workers (their Worker service, KV endpoint and data channel) and the controller's
    # metrics listen. Empty: loopback for a local cluster; each Ray node's address when joining one.
    worker_host: str = ""
    registry: str = ""  # empty: in-process (one router); redis://host:port/db shares it
    # The cluster's shared secret: KV transfers and the workers' Worker service require it. Empty:
    # `pdcluster serve` takes PDCLUSTER_KV_TOKEN, or generates one, and hands it to every worker
    # and router (through the registry for routers elsewhere).
    auth_token: str = ""
    tls: TLSFiles = TLSFiles()  # cert/key/ca files present on every node: TLS (mTLS with ca) everywhere
    engine: EngineConfig = Field(default_factory=EngineConfig)
    prefill: PoolSpec = Field(default_factory=PoolSpec)
    decode: PoolSpec = Field(default_factory=PoolSpec)
    router: RouterConfig = Field(default_factory=RouterConfig)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    controller_metrics_port: int = 0  # the controller's Prometheus endpoint; 0 picks a free port
    health_interval_s: float = Field(1.0, gt=0)
    unhealthy_after: int = Field(3, ge=1)  # failed health checks in a row before a replace
    # More models behind the same router, each with its own engine and pools (see ModelSpec).
    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _model_names_unique(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: each name once, not {names}")
        return self

    def model_clusters(self) -> list[ClusterSpec]:
        """One single-model spec per model, the spec's own first: each runs under its own
        controller and name (Ray actors, registry keys), on the same Ray cluster, registry and
        secret, so pools of several models share nodes through Ray's resources."""
        clusters = [self.model_copy(update={"models": []})]
        for model in self.models:
            update = {
                "models": [],
                "name": f"{self.name}-{model.name}",
                "engine": model.engine,
                "prefill": model.prefill,
                "decode": model.decode,
                "router": self.router.model_copy(update={"vllm_args": model.serving_flags()}),
                "controller_metrics_port": 0,  # one port per controller
            }
            clusters.append(self.model_copy(update=update))
        return clusters

    @model_validator(mode="after")
    def _switching_pools_run_one_engine(self):
        if self.autoscaling.role_switching and self.pool_engine(Role.PREFILL) != self.pool_engine(Role.DECODE):
            raise ValueError("autoscaling.role_switching moves replicas between the pools: give both the same engine arguments")
        return self

    @model_validator(mode="after")
    def _slo_signal_has_a_profile(self):
        if self.autoscaling.signal == "slo" and not self.router.profile:
            raise ValueError("autoscaling.signal: slo predicts latencies from a profile: set router.profile (`pdcluster profile`)")
        return self

    def pool(self, role: Role) -> PoolSpec:
        return self.prefill if role == Role.PREFILL else self.decode

    def bind_host(self) -> str:
        """The address workers listen on; empty: the address of the Ray node each one runs on."""
        return self.worker_host or ("" if self.ray_address else "127.0.0.1")

    def worker_config(self, role: Role, worker_id: str) -> WorkerConfig:
        """Everything one replica of the pool needs, handed to its process whole."""
        pool = self.pool(role)
        fields = dict(
            role=role,
            worker_id=worker_id,
            host=self.bind_host(),
            auth_token=self.auth_token,
            kv=pool.kv,
            registry=self.registry,
            tls=self.tls,
            cluster_name=self.name,
            engine=self.pool_engine(role),
            role_switching=self.autoscaling.role_switching,
        )
        return WorkerConfig.model_validate(fields, context={ENGINE_ARGS_CHECKED: True})

    def pool_engine(self, role: Role) -> EngineConfig:
        """The spec's engine with the pool's own engine arguments and tensor parallelism on top
        (each checked by vLLM where the spec was made)."""
        pool = self.pool(role)
        base = self.engine.model_dump()
        if "kv_cache_memory_bytes" in pool.engine:
            base.pop("kv_cache_gib", None)  # the pool sizes its own cache, by vLLM's argument
        merged = {**base, **pool.engine, "tensor_parallel_size": pool.tensor_parallel_size}
        return EngineConfig.model_validate(merged, context={ENGINE_ARGS_CHECKED: True})

    def router_config(self) -> RouterConfig:
        """The router in front of this cluster: its spec section plus what it shares with the cluster."""
        return self.router.model_copy(
            update={
                "model": self.engine.model,
                "engine": self.engine.vllm_args,  # the workers' engine arguments: the same model config
                "registry": self.registry,
                "cluster_name": self.name,
                "tls": self.tls,
                "worker_token": self.auth_token,
                "cost_per_hour": PoolCosts(prefill=self.prefill.cost_per_hour, decode=self.decode.cost_per_hour),
            }
        )


# `pdcluster serve` flags and the spec field each one overrides (when given).
_SERVE_FLAGS: list[tuple[str, str, dict]] = [
    ("--model", "engine.model", dict(help="HF model directory (default: the tiny generated model)")),
    ("--host", "router.host", dict(help="router bind address (default 127.0.0.1)")),
    ("--port", "router.port", dict(type=int, help="OpenAI HTTP port (default 8000)")),
    ("--grpc-port", "router.grpc_port", dict(type=int, help="gRPC Inference port (default 50051)")),
    ("--api-key", "router.api_key", dict(default=os.environ.get("PDCLUSTER_API_KEY"), help="env PDCLUSTER_API_KEY")),
    ("--prefill", "prefill.replicas", dict(type=int, help="prefill replicas")),
    ("--decode", "decode.replicas", dict(type=int, help="decode replicas")),
    ("--address", "ray_address", dict(help="join this Ray cluster (e.g. auto) instead of starting one")),
    ("--registry", "registry", dict(help="redis://HOST:PORT/DB to share membership between routers")),
    ("--profile", "router.profile", dict(help="the workers' `pdcluster profile`: place each prompt by predicted TTFT and ITL")),
    ("--slo-ttft-ms", "router.slo.ttft_ms", dict(type=float, help="TTFT SLO placement keeps (default 1000)")),
    ("--slo-itl-ms", "router.slo.itl_ms", dict(type=float, help="ITL (TPOT) SLO placement keeps (default 20)")),
]


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """`pdcluster serve [MODEL]` flags; each one given overrides the spec file. Any other flag,
    and the model given positionally, is `vllm serve`'s (see `load_cluster_spec`)."""
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="a cluster spec YAML (see deploy/cluster.example.yaml), or a `vllm serve --config` YAML (told apart by their keys); "
        "either or both",
    )
    for role in ("prefill", "decode"):
        parser.add_argument(f"--{role}-args", default="", help=f"vLLM engine flags for the {role} pool only, e.g. '--max-num-seqs 8'")
    for flag, path, kwargs in _SERVE_FLAGS:
        parser.add_argument(flag, dest=path, metavar=flag.removeprefix("--").upper().replace("-", "_"), **{"default": None, **kwargs})
    parser.add_argument(
        "--kv-transport",
        choices=TRANSPORTS,
        default=None,
        help="KV data path of both pools (default auto: nixl where it reaches, else tcp)",
    )
    parser.add_argument("--no-router", action="store_true", help="controller and pools only (routers run elsewhere, on --registry)")


def load_cluster_spec(args: argparse.Namespace, vllm_flags: Sequence[str] = ()) -> ClusterSpec:
    """The spec from `--config` (if any), with the flags given on the command line on top.

    `vllm_flags` is the rest of the command line, as `vllm serve` takes it: the model (positional
    or `--model`), and flags, the engine arguments among which go to every worker's engine (and
    the pool's `--prefill-args`/`--decode-args` to that pool's), and all of which go to the
    router's vLLM layer, which also takes the serving ones (--served-model-name,
    --tool-call-parser, ...). A `--config` file whose top-level keys are not all cluster-spec
    fields is a `vllm serve` config: its flags come before the command line's, so, as in vLLM,
    the command line wins over it, and both win over the cluster spec. vLLM's parsers check
    every flag here, before anything starts."""
    data: dict = {}
    config_flags: list[str] = []
    for path in args.config:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: not a YAML mapping")
        if set(loaded) <= set(ClusterSpec.model_fields):
            data = _merged(data, loaded)
        else:
            config_flags += vllm_config_flags(path)
    for _, path, _ in _SERVE_FLAGS:
        value = getattr(args, path)
        if value is not None:
            *parents, leaf = path.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    config_model, config_flags = split_serve_command_line(config_flags)
    model, flags = split_serve_command_line(list(vllm_flags))
    engine = data.setdefault("engine", {})
    model_flag = getattr(args, "engine.model")  # `--model`, read with pdcluster's own flags
    if model and model_flag and model != model_flag:
        raise ValueError(f"two models given: {model} and --model {model_flag}")
    if model or config_model:
        engine["model"] = model or model_flag or config_model
    flags = [*config_flags, *flags]
    engine_args, _serving = engine_args_from_flags(flags)
    engine.update(engine_args)
    for role in ("prefill", "decode"):
        pool_args, unknown = engine_args_from_flags(shlex.split(getattr(args, f"{role}_args")))
        if unknown:
            raise ValueError(f"--{role}-args: not vLLM engine flags: {' '.join(unknown)}")
        data.setdefault(role, {}).setdefault("engine", {}).update(pool_args)
        if args.kv_transport:
            data[role].setdefault("kv", {})["transport"] = args.kv_transport
    router = data.setdefault("router", {})
    router["vllm_args"] = [*router.get("vllm_args", []), *flags]
    spec = ClusterSpec.model_validate(data)  # replicas given widen the pool's bounds (PoolSpec._bounds)
    vllm_serve_args(spec.engine.model or "model", spec.router.vllm_args)  # vLLM refuses a flag it does not know
    return spec


def upgrade_spec(configs: Sequence[str], vllm_flags: Sequence[str], pool_args: dict[str, str]) -> ClusterSpec:
    """The spec a rolling upgrade moves a pool to: what `pdcluster serve` would build from the
    same spec files and flags (`pool_args`: each role's --ROLE-args)."""
    args = argparse.Namespace(
        config=list(configs),
        kv_transport=None,
        **{f"{role}_args": pool_args.get(role, "") for role in ("prefill", "decode")},
        **{path: None for _, path, _ in _SERVE_FLAGS},
    )
    return load_cluster_spec(args, vllm_flags)


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mapping into mapping (two cluster specs given)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
