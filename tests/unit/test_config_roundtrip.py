"""One config source: every setting of the cluster spec reaches the worker process that
needs it (as the JSON the controller hands it), and every engine setting reaches vLLM."""

from __future__ import annotations

import pytest

from pdcluster.cluster.cluster_spec import ClusterSpec
from pdcluster.common.worker_record import ROLES
from pdcluster.router.config import RouterConfig, parse_router_args
from pdcluster.worker.config import EngineConfig, parse_worker_config, worker_args
from pdcluster.worker.engine_args import engine_environment, engine_kwargs

# A value unlike the default for every engine field: a new field without one fails here.
ENGINE = {
    "model": "/models/some-model",
    "dtype": "bfloat16",
    "max_model_len": 2048,
    "kv_cache_gib": 3.0,
    "max_num_seqs": 7,
    "max_num_batched_tokens": 512,
    "enable_prefix_caching": False,
    "tensor_parallel_size": 1,  # per pool: set from the pool's own field below
    "gpu_memory_utilization": 0.5,
}


def spec() -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "name": "c9",
            "registry": "redis://10.1.1.1:6379/2",
            "auth_token": "cluster-secret",
            "tls": {"cert": "/tls/c.pem", "key": "/tls/k.pem", "ca": "/tls/ca.pem"},
            "engine": ENGINE,
            "prefill": {"tensor_parallel_size": 2, "kv_transport": "grpc"},
            "decode": {"tensor_parallel_size": 4, "kv_transport": "tcp"},
        }
    )


def test_the_engine_values_cover_every_field():
    assert set(ENGINE) == set(EngineConfig.model_fields)
    defaults = EngineConfig()
    assert [k for k, v in ENGINE.items() if getattr(defaults, k) == v] == ["tensor_parallel_size"]


@pytest.mark.parametrize("role", ROLES)
def test_every_spec_field_reaches_the_worker(role):
    s = spec()
    sent = s.worker_config(role, f"{role}-1")
    received = parse_worker_config(role, worker_args(sent))
    assert received == sent
    pool = s.pool(role)
    assert received.engine == EngineConfig(**{**ENGINE, "tensor_parallel_size": pool.tensor_parallel_size})
    assert (received.kv_transport, received.registry, received.tls, received.cluster_name) == (pool.kv_transport, s.registry, s.tls, "c9")
    assert received.worker_id == f"{role}-1" and received.role == role and received.auth_token == "cluster-secret"


def test_flags_override_single_fields_of_the_config():
    sent = spec().worker_config(ROLES[0], "w")
    received = parse_worker_config(ROLES[0], [*worker_args(sent), "--kv-load-timeout", "5", "--enable-prefix-caching", "--port", "9"])
    assert (received.kv_load_timeout_s, received.engine.enable_prefix_caching, received.port) == (5.0, True, 9)
    assert received.engine.max_model_len == 2048 and received.tls == sent.tls


def test_every_engine_setting_reaches_vllm():
    engine = EngineConfig(**ENGINE)
    kwargs = engine_kwargs(engine)
    assert {
        k: kwargs[k]
        for k in (
            "model",
            "dtype",
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "enable_prefix_caching",
            "tensor_parallel_size",
        )
    } == {k: v for k, v in ENGINE.items() if k not in ("kv_cache_gib", "gpu_memory_utilization")}
    assert engine_environment(engine)["VLLM_CPU_KVCACHE_SPACE"] == "3"
    # GPU only: on CPU the KV cache size above is what vLLM uses instead.
    assert kwargs.get("gpu_memory_utilization", 0.5) == 0.5


def test_router_flags_are_the_router_config_fields():
    config = parse_router_args(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "1",
            "--grpc-port",
            "2",
            "--model",
            "/m",
            "--worker",
            "a:1",
            "--worker",
            "b:2",
            "--bypass-prefill-below",
            "9",
            "--local-prefill-above-queued",
            "99",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--max-queue",
            "3",
            "--decode-idle-timeout-s",
            "7",
        ]
    )
    assert config == RouterConfig(
        host="0.0.0.0",
        port=1,
        grpc_port=2,
        model="/m",
        workers=["a:1", "b:2"],
        bypass_prefill_below_tokens=9,
        local_prefill_above_queued_tokens=99,
        tls={"cert": "c", "key": "k"},
        max_queue=3,
        decode_idle_timeout_s=7,
    )
    assert (spec().router_config().registry, spec().router_config().worker_token) == ("redis://10.1.1.1:6379/2", "cluster-secret")


def test_the_environment_fills_only_what_the_config_and_flags_leave_unset(monkeypatch):
    monkeypatch.setenv("PDCLUSTER_KV_TOKEN", "from-env")
    monkeypatch.setenv("PDCLUSTER_API_KEY", "key-from-env")
    assert parse_worker_config(ROLES[0], []).auth_token == "from-env"
    sent = spec().worker_config(ROLES[0], "w")  # carries the spec's token
    assert parse_worker_config(ROLES[0], worker_args(sent)).auth_token == "cluster-secret"
    assert parse_worker_config(ROLES[0], [*worker_args(sent), "--auth-token", "flag"]).auth_token == "flag"
    router = parse_router_args([])
    assert (router.worker_token, router.api_key) == ("from-env", "key-from-env")
