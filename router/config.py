"""Typed configuration of the router: from the cluster spec (YAML), or from flags derived
from these same fields (`python -m pdcluster.router --help`)."""

from __future__ import annotations

import argparse
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from pdcluster.common.config_flags import add_model_flags, env_values, flag_values, merged
from pdcluster.common.slo import SLO
from pdcluster.common.tls import TLSFiles

PrefillRouting = Literal["kv-events", "guess", "round-robin"]
PREFILL_ROUTING_MODES: tuple[str, ...] = get_args(PrefillRouting)


class TenantConfig(BaseModel):
    """One customer of the endpoint: its API keys, its admission class, its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    api_keys: list[str] = Field(min_length=1, description="`Authorization: Bearer KEY` values that identify the tenant")
    priority: int = Field(0, description="admission class: a lower class is admitted first; fair shares within a class")
    max_concurrent: int = Field(0, ge=0, description="requests (samples) admitted or queued at once; past it: 429 (0: no limit)")
    tokens_per_minute: int = Field(
        0, ge=0, description="prompt plus generated tokens over the last 60 s; past it: 429 until enough age out (0: no limit)"
    )
    models: list[str] = Field(default_factory=list, description="model names it may use (served names or adapters; empty: all)")
    response_cache: bool = Field(False, description="answer its exact repeats of deterministic requests from the response cache")


class AliasRule(BaseModel):
    """One rule of a model alias: the model it picks when every condition it states holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", description="its label in the decision metrics (default: its place, rules[i])")
    model: str = Field(min_length=1, description="the served model name it picks")
    min_prompt_tokens: int = Field(0, ge=0, description="prompts of at least this many tokens")
    max_prompt_tokens: int | None = Field(None, ge=0, description="prompts of at most this many tokens")
    tenants: list[str] = Field(default_factory=list, description="callers of these tenants (empty: any)")
    headers: dict[str, str] = Field(default_factory=dict, description="requests with these header values (names in any case)")


class ModelAlias(BaseModel):
    """A model name that stands for others: the first rule that holds picks the model, else the
    default; a pick whose model is saturated goes to `overflow` instead, unless that one is too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="the name requests give, e.g. auto")
    rules: list[AliasRule] = Field(default_factory=list)
    default: str = Field(min_length=1, description="the model when no rule holds")
    overflow: str = Field("", description="the model a saturated pick goes to (empty: none)")
    overflow_at_inflight: int = Field(
        0, ge=0, description="a model is saturated with this many requests running at this router (0: once its requests queue)"
    )


class ResponseCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field("", description="redis://HOST:PORT/DB of the response cache (default: the --registry)")
    ttl_s: float = Field(3600.0, gt=0, description="how long a cached response is served")


class PoolCosts(BaseModel):
    """USD per replica-hour of each pool (the spec's pools' `cost_per_hour`): what /v1/usage bills."""

    model_config = ConfigDict(extra="forbid")

    prefill: float = Field(0.0, ge=0, description="USD per prefill replica-hour")
    decode: float = Field(0.0, ge=0, description="USD per decode replica-hour")


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in the spec is an error, not a default

    host: str = "127.0.0.1"
    port: int = Field(8000, description="OpenAI HTTP port (0: any free port)")
    grpc_port: int = Field(50051, description="gRPC Inference port (0: any free port)")
    model: str = Field("", description="HF model directory (default: the tiny generated model)")
    vllm_args: list[str] = Field(
        default_factory=list,
        description="vLLM's own `vllm serve` options for the OpenAI layer and the model, e.g. --served-model-name, "
        "--chat-template, --enable-auto-tool-choice --tool-call-parser NAME, --reasoning-parser NAME, --max-model-len; "
        "on the command line, every flag the router does not know itself",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="the workers' vLLM engine arguments (a cluster spec's `engine:`), for the router's model config",
    )
    workers: list[str] = Field(
        default_factory=list, description="Worker gRPC address; repeat per worker", json_schema_extra={"flag": "--worker"}
    )
    worker_token: str = Field(
        "",
        description="the cluster token the workers require (with --registry, read from the registry when not given)",
        json_schema_extra={"env": "PDCLUSTER_KV_TOKEN"},
    )
    registry: str = Field("", description="redis://HOST:PORT/DB: follow the workers announced there instead of --worker")
    cluster_name: str = "pdcluster"
    tls: TLSFiles = Field(default_factory=TLSFiles, description="HTTPS, the Inference service and channels to workers")
    api_key: str = Field(
        "", description="require `Authorization: Bearer KEY`; empty: no auth", json_schema_extra={"env": "PDCLUSTER_API_KEY"}
    )
    tenants: list[TenantConfig] = Field(
        default_factory=list, description="the endpoint's tenants; with them, each tenant's keys are the API keys"
    )
    tenants_file: str = Field(
        "", description="a YAML list of tenants (as `tenants:` in the spec), e.g. a mounted Kubernetes Secret; added to `tenants`"
    )
    response_cache: ResponseCacheConfig = Field(default_factory=ResponseCacheConfig)
    aliases: list[ModelAlias] = Field(
        default_factory=list, description="model names that resolve, by rules, to served ones (the response names the one that answered)"
    )
    cost_per_hour: PoolCosts = Field(default_factory=PoolCosts, description="set from the spec's pools")
    bypass_prefill_below_tokens: int = Field(
        64,
        description="prompts shorter than this many tokens skip remote prefill (before any prediction)",
        json_schema_extra={"flag": "--bypass-prefill-below"},
    )
    local_prefill_above_queued_tokens: int = Field(
        0,
        description="run a prompt on the decode worker when the best prefill worker already has more than this many "
        "prompt tokens queued (trades ITL for TTFT under a prefill backlog; 0: never); set, it overrides the "
        "predictions of --profile",
        json_schema_extra={"flag": "--local-prefill-above-queued"},
    )
    max_inflight: int = Field(256, description="requests running at once")
    max_queue: int = Field(512, description="requests waiting for a slot; past it: 429")
    max_body_bytes: int = 4 << 20
    max_n: int = 16
    max_attempts: int = Field(4, description="tries per request across workers (prefill retries, decode resumes)")
    prefill_timeout_s: float = 300.0
    decode_idle_timeout_s: float = Field(300.0, description="longest silence on a token stream before failover")
    capacity_wait_s: float = Field(120.0, description="how long a request waits for a healthy decode worker (one restarting)")
    health_interval_s: float = 1.0
    health_timeout_s: float = Field(2.0, description="how long one health check may take (a busy worker answers late)")
    unhealthy_after: int = Field(
        2, description="health checks missed in a row before a worker counts as lost: its requests retry or resume elsewhere"
    )
    prefill_routing: PrefillRouting = Field(
        "kv-events",
        description="which prefill worker computes a prompt: the least queued work once the prefix it holds is taken off, "
        "the prefix known from its engine's KV cache events (kv-events) or guessed from where prompts went (guess); "
        "or each in turn (round-robin)",
    )
    recompute_weight: float = Field(
        2.0,
        gt=0,
        description="in the prefill choice (kv-events, guess), what a prompt token a worker would compute weighs against a "
        "token already queued there: above 1, the worker holding the prompt's prefix keeps it over a less busy one that "
        "would compute it again, which costs this prompt and, in capacity taken, the prompts queued behind it",
    )
    profile: str = Field(
        "",
        description="the workers' engine profile (a `pdcluster profile` file): with it, each prompt is computed where its "
        "predicted TTFT and the ITL it costs others keep the SLOs, on a prefill worker or its decode worker; without it, "
        "on a prefill worker unless a rule (--bypass-prefill-below, --local-prefill-above-queued) says otherwise",
    )
    slo: SLO = Field(default_factory=SLO, description="the SLOs placement keeps (with --profile)")
    peer_pull_min_tokens: int = Field(
        1024,
        ge=0,
        description="a prefill worker lacking a prompt prefix that another worker holds pulls its KV from that worker "
        "when the pull saves at least this many prompt tokens (and, with --profile, is predicted faster than computing "
        "them); 0: never pull",
    )
    prefix_index_blocks: int = Field(65536, description="block hashes remembered per prefill worker")
    drain_timeout_s: float = Field(60.0, description="on SIGTERM: how long running requests and streams may take to finish")
    ready_file: str = ""


def parse_router_args(argv: list[str] | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser(
        prog="python -m pdcluster.router",
        description="pdcluster router; any other flag is one of `vllm serve`'s, for vLLM's OpenAI layer",
        allow_abbrev=False,  # a vLLM flag must never be taken for a prefix of one of ours
    )
    # vLLM's flags; tenants: --tenants-file; aliases: in the spec
    add_model_flags(parser, RouterConfig, exclude=("vllm_args", "engine", "tenants", "aliases"))
    args, vllm_args = parser.parse_known_args(argv)
    return RouterConfig.model_validate(merged(env_values(RouterConfig), {**flag_values(args), "vllm_args": vllm_args}))
