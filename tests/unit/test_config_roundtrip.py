"""One config source: every setting of the cluster spec reaches the worker process that
needs it (as the JSON the controller hands it), and every engine setting reaches vLLM."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdcluster.cluster.cluster_spec import ClusterSpec, load_cluster_spec
from pdcluster.common.worker_record import ROLES, Role
from pdcluster.kv_transfer.settings import KVEndpointSettings, KVTransferSettings
from pdcluster.router.config import RouterConfig, parse_router_args
from pdcluster.worker.config import EngineConfig, parse_worker_config, worker_args
from pdcluster.worker.engine_args import engine_environment, engine_kwargs, pd_kv_transfer

# vLLM engine arguments by vLLM's names, each unlike vLLM's and pdcluster's defaults.
ENGINE = {
    "model": "/models/some-model",
    "kv_cache_gib": 3.0,
    "dtype": "bfloat16",
    "max_model_len": 2048,
    "max_num_seqs": 7,
    "max_num_batched_tokens": 512,
    "enable_prefix_caching": False,
    "gpu_memory_utilization": 0.5,
    "quantization": "fp8",
    "speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
}


def spec() -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "name": "c9",
            "registry": "redis://10.1.1.1:6379/2",
            "auth_token": "cluster-secret",
            "tls": {"cert": "/tls/c.pem", "key": "/tls/k.pem", "ca": "/tls/ca.pem"},
            "engine": ENGINE,
            "prefill": {"tensor_parallel_size": 2, "kv_transport": "grpc", "engine": {"max_num_batched_tokens": 8192}},
            "decode": {"tensor_parallel_size": 4, "kv_transport": "tcp"},
        }
    )


def test_the_engine_takes_any_vllm_engine_argument_and_refuses_others_by_name():
    assert EngineConfig(**ENGINE).vllm_args == {k: v for k, v in ENGINE.items() if k not in ("model", "kv_cache_gib")}
    with pytest.raises(ValueError, match="not vLLM engine arguments: max_model_lenn"):
        EngineConfig(max_model_lenn=2048)
    with pytest.raises(ValueError, match="max-num-seqs: invalid int value"):  # vLLM's own parser checks values
        EngineConfig(max_num_seqs="lots")
    with pytest.raises(ValueError, match="not vLLM engine arguments: max_tokens"):
        ClusterSpec.model_validate({"decode": {"engine": {"max_tokens": 5}}})


@pytest.mark.parametrize("role", ROLES)
def test_every_spec_field_reaches_the_worker(role):
    s = spec()
    sent = s.worker_config(role, f"{role}-1")
    received = parse_worker_config(role, worker_args(sent))
    assert received == sent
    pool = s.pool(role)
    expected = {**ENGINE, **pool.engine, "tensor_parallel_size": pool.tensor_parallel_size}
    assert received.engine == EngineConfig(**expected)
    assert (received.kv, received.registry, received.tls, received.cluster_name) == (pool.kv, s.registry, s.tls, "c9")
    assert received.worker_id == f"{role}-1" and received.role == role and received.auth_token == "cluster-secret"


def test_flags_override_single_fields_of_the_config():
    sent = spec().worker_config(ROLES[0], "w")
    received = parse_worker_config(ROLES[0], [*worker_args(sent), "--kv-load-timeout", "5", "--enable-prefix-caching", "--port", "9"])
    assert (received.kv.load_timeout_s, received.engine.enable_prefix_caching, received.port) == (5.0, True, 9)
    assert received.engine.max_model_len == 2048 and received.tls == sent.tls
    with pytest.raises(SystemExit):  # neither ours nor vLLM's
        parse_worker_config(ROLES[0], ["--no-such-flag", "1"])


def test_every_engine_setting_reaches_vllm():
    engine = EngineConfig(**ENGINE)
    kwargs = engine_kwargs(engine)
    assert kwargs == {"seed": 0, **{k: v for k, v in ENGINE.items() if k != "kv_cache_gib"}}
    assert engine_environment(engine)["VLLM_CPU_KVCACHE_SPACE"] == "3"
    # vLLM's own flag sizes the KV cache where given: the CPU variable would override it.
    sized = EngineConfig(kv_cache_memory_bytes=256 << 20)
    assert engine_kwargs(sized)["kv_cache_memory_bytes"] == 256 << 20 and "VLLM_CPU_KVCACHE_SPACE" not in engine_environment(sized)
    # pdcluster's defaults where vLLM's do not suit a CPU machine; the tiny model in float32.
    assert engine_kwargs(EngineConfig()) | {"model": ""} == {
        "model": "",
        "max_model_len": 4096,
        "max_num_seqs": 64,
        "seed": 0,
        "dtype": "float32",
    }


def test_the_kv_cache_size_is_given_once():
    with pytest.raises(ValueError, match="KV cache size is given twice"):
        EngineConfig(kv_cache_gib=2, kv_cache_memory_bytes=256 << 20)
    with pytest.raises(ValueError, match="KV cache size is given twice"):
        parse_worker_config(Role.DECODE, ["--kv-cache-gib", "2", "--kv-cache-memory-bytes", "256M"])
    # vLLM's argument alone crosses the config's JSON round trip to the worker (pdcluster's
    # default is not written out, so it is not read back as given).
    s = ClusterSpec.model_validate({"engine": {"kv_cache_memory_bytes": 256 << 20}})
    sent = s.worker_config(Role.DECODE, "decode-1")
    assert parse_worker_config(Role.DECODE, worker_args(sent)).engine.vllm_args["kv_cache_memory_bytes"] == 256 << 20
    # A pool that sizes its cache by vLLM's argument overrides the spec's kv_cache_gib.
    s = ClusterSpec.model_validate({"engine": {"kv_cache_gib": 2}, "decode": {"engine": {"kv_cache_memory_bytes": 256 << 20}}})
    assert s.pool_engine(Role.PREFILL).kv_cache_gib == 2
    decode = parse_worker_config(Role.DECODE, worker_args(s.worker_config(Role.DECODE, "decode-1"))).engine
    assert decode.vllm_args["kv_cache_memory_bytes"] == 256 << 20 and "VLLM_CPU_KVCACHE_SPACE" not in engine_environment(decode)


def test_vllm_offloading_flags_size_our_connectors_host_tier():
    # vLLM would swap our connector for its own OffloadingConnector; ours keeps the tier instead.
    kwargs = engine_kwargs(EngineConfig(kv_offloading_size=0.5), pd_kv_transfer({"transport": "tcp"}))
    assert "kv_offloading_size" not in kwargs
    config = kwargs["kv_transfer_config"]
    assert config.kv_connector == "PdConnector"
    assert config.kv_connector_extra_config == {"transport": "tcp", "tier_bytes": 1 << 29}
    assert KVEndpointSettings.model_validate(config.kv_connector_extra_config).tier_bytes == 1 << 29
    with pytest.raises(ValueError, match="--kv-offloading-backend lmcache"):
        EngineConfig(kv_offloading_size=1, kv_offloading_backend="lmcache")


def test_pdcluster_serve_takes_vllm_serve_flags():
    from pdcluster.cli import build_parser

    argv = [
        "serve",
        "/models/x",
        "--max-model-len",
        "2048",
        "--served-model-name",
        "x",
        "y",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "pythonic",
        "--prefill-args",
        "--max-num-batched-tokens 8192",
        "--kv-transport",
        "nixl",
        "--profile",
        "/profiles/cpu.json",
        "--slo-itl-ms",
        "50",
    ]
    args, vllm_flags = build_parser().parse_known_args(argv)
    s = load_cluster_spec(args, vllm_flags)
    assert s.router.profile == "/profiles/cpu.json" and (s.router.slo.ttft_ms, s.router.slo.itl_ms) == (1000, 50)
    assert s.engine.model == "/models/x" and s.engine.max_model_len == 2048
    assert s.prefill.kv.transport == s.decode.kv.transport == "nixl"
    assert (
        s.pool_engine(Role.PREFILL).max_num_batched_tokens == 8192 and "max_num_batched_tokens" not in s.pool_engine(Role.DECODE).vllm_args
    )
    router = s.router_config()
    assert router.vllm_args == [f for f in vllm_flags if f != "/models/x"] and router.engine["max_model_len"] == 2048
    with pytest.raises(SystemExit):  # vLLM's parser refuses what is not one of its flags
        load_cluster_spec(*build_parser().parse_known_args(["serve", "--max-model-length", "5"]))


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


def test_every_kv_transfer_setting_is_set_from_the_spec_and_from_worker_flags():
    """Each field of KVTransferSettings: a pool's `kv:` reaches the worker's config, and the
    worker's `--kv-*` flag overrides it; the connector receives both with the worker's own."""
    values = {
        "transport": "grpc",
        "port": 7001,
        "data_port": 7002,
        "data_advertise": "10.0.0.9:7002",
        "chunk_bytes": 1 << 20,
        "streams_per_transfer": 3,
        "load_timeout_s": 11.0,
        "producer_lost_after_s": 2.5,
        "send_timeout_s": 13.0,
        "send_retries": 4,
        "max_staged_bytes": 1 << 20,
        "staged_ttl_s": 7.0,
        "tier_dir": "/var/cache/kv-tier",
    }
    assert set(values) == set(KVTransferSettings.model_fields)
    s = ClusterSpec.model_validate({"decode": {"kv": values}, "prefill": {"kv_transport": "tcp"}})
    sent = s.worker_config(Role.DECODE, "d")
    assert sent.kv == KVTransferSettings(**values) and s.prefill.kv.transport == "tcp"
    flags = {"--kv-load-timeout": "3", "--kv-send-timeout": "4", "--kv-producer-lost-after-s": "1.5", "--kv-send-retries": "0"}
    received = parse_worker_config(Role.DECODE, [*worker_args(sent), *(x for kv in flags.items() for x in kv)])
    expected = KVTransferSettings(
        **{**values, "load_timeout_s": 3.0, "send_timeout_s": 4.0, "producer_lost_after_s": 1.5, "send_retries": 0}
    )
    assert received.kv == expected
    endpoint = KVEndpointSettings.from_extra_config(
        KVEndpointSettings(**dict(received.kv), host="10.0.0.1", auth_token="t").model_dump(mode="json")
    )
    assert KVTransferSettings(**{k: getattr(endpoint, k) for k in values}) == expected and endpoint.host == "10.0.0.1"
    with pytest.raises(ValidationError, match="chunk_bytes"):
        KVTransferSettings(chunk_bytes=0)
    with pytest.raises(ValidationError, match="no_such_key"):
        KVEndpointSettings.from_extra_config({"no_such_key": 1})
