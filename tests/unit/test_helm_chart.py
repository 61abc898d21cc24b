"""The Helm chart lints strictly, renders, and its manifests validate: core objects against
the Kubernetes schemas (kubernetes-validate, offline), the RayCluster against KubeRay's
CRD schema for the fields used (tests/schemas) with its pod templates against the core
PodTemplateSpec, and what pdcluster itself reads (the cluster spec, the router flags)
against pdcluster's own parsers."""

from __future__ import annotations

import copy
import json
import os

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pdcluster.cli import build_parser
from pdcluster.cluster.cluster_spec import ClusterSpec
from pdcluster.common.engine_profile import EngineProfile
from pdcluster.router.config import parse_router_args

from tests.support.paths import ROOT

CHART = os.path.join(ROOT, "deploy", "helm", "pdcluster")
KUBE_VERSION = "1.30.0"
FULL_VALUES = {
    "tls": {"enabled": True, "secretName": "pd-tls"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "apiKey": {"existingSecret": "pd-api-key"},
    "kvToken": {"existingSecret": "pd-kv-token"},
    "model": {"volume": {"persistentVolumeClaim": {"claimName": "llama"}}},
    "engine": {"args": {"quantization": "fp8", "enable_chunked_prefill": True}},
    "router": {
        "vllmArgs": ["--served-model-name", "llama", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        "profileJSON": (ROOT / "bench" / "profiles" / "cpu1-bench-llama.json").read_text(),
        "slo": {"ttftMs": 2000, "itlMs": 50},
        "tenantsSecret": "pd-tenants",
    },
    "autoscaling": {"signal": "slo"},
    "prefill": {
        "engineArgs": {"max_num_batched_tokens": 16384},
        "replicas": 3,
        "maxReplicas": 9,
        "replicasPerNode": 2,
        "costPerHour": 2.99,
        "kvOffloading": {"sizeGiB": 1.5},
        "nodeSelector": {"pool": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "decode": {"nodeSelector": {"pool": "h200"}},
    "models": [
        {
            "name": "small",
            "engine": {"model": "/models/small", "max_model_len": 4096},
            "prefill": {"replicas": 0},
            "decode": {"num_gpus": 1, "node_resource": "decode_pool", "cost_per_hour": 1.2},
        }
    ],
}


def schema(name: str) -> dict:
    with open(os.path.join(os.path.dirname(__file__), "schemas", name)) as f:
        return json.load(f)


def render(values: dict | None) -> list[dict]:
    from helm_python import Chart

    manifests = Chart.load(CHART).render(values, name="demo", namespace="llm")
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def test_chart_lints_strictly():
    from helm_python import lint

    for values in (None, FULL_VALUES):
        report = lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        assert not report["errors"], report
        assert not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "full"])
def test_rendered_manifests_validate(values):
    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Deployment", "Deployment", "RayCluster", "Service", "Service", "Service"]
    assert kinds == sorted(expected + (["ScrapeConfig", "ServiceMonitor"] if values else []))
    for doc in docs:
        if doc["kind"] == "RayCluster":
            jsonschema.validate(doc, schema("raycluster-v1.json"))
            groups = [doc["spec"]["headGroupSpec"]] + doc["spec"]["workerGroupSpecs"]
            for group in groups:
                pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": group["template"]}
                kubernetes_validate.validate(pod_template, KUBE_VERSION, strict=True)
        elif doc["kind"] == "ServiceMonitor":
            jsonschema.validate(doc, schema("servicemonitor-v1.json"))
        elif doc["kind"] == "ScrapeConfig":
            jsonschema.validate(doc, schema("scrapeconfig-v1alpha1.json"))
            # Prometheus finds the workers through the router's discovery endpoint, with its key.
            (sd,) = doc["spec"]["httpSDConfigs"]
            assert sd["url"] == "https://demo-router.llm.svc:8000/prometheus/targets"
            assert sd["authorization"]["credentials"]["name"] == "pd-api-key"
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # The validators are live: a wrong type and an unknown field are caught.
    deployment = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    cluster = copy.deepcopy(next(d for d in docs if d["kind"] == "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, schema("raycluster-v1.json"))


def test_pools_get_their_nodes_gpus_and_ray_resources():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(FULL_VALUES)}
    groups = {g["groupName"]: g for g in docs[("RayCluster", "demo")]["spec"]["workerGroupSpecs"]}
    prefill, decode = groups["prefill"], groups["decode"]
    # 3 replicas, 2 per node: 2 nodes (max 9 -> 5).
    assert (prefill["replicas"], prefill["minReplicas"], prefill["maxReplicas"]) == (2, 1, 5)
    assert json.loads(json.loads(prefill["rayStartParams"]["resources"])) == {"prefill_pool": 2}
    assert json.loads(json.loads(decode["rayStartParams"]["resources"])) == {"decode_pool": 1}
    assert prefill["template"]["spec"]["nodeSelector"] == {"pool": "h100"}
    assert decode["template"]["spec"]["nodeSelector"] == {"pool": "h200"}
    assert prefill["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    for group in (prefill, decode):
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {e["name"] for e in container["env"]} >= {"PDCLUSTER_KV_TOKEN", "PDCLUSTER_API_KEY"}
    # The prefill pool's host KV tier: an in-memory volume for both replicas on a node, where the spec puts it.
    (tier,) = [v for v in prefill["template"]["spec"]["volumes"] if v["name"] == "kv-tier"]
    assert tier["emptyDir"] == {"medium": "Memory", "sizeLimit": "5Gi"}
    mounts = {m["name"]: m["mountPath"] for m in prefill["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["kv-tier"] == "/var/lib/pdcluster/kv-tier"
    assert "kv-tier" not in str(decode["template"]["spec"])


def test_what_pdcluster_reads_from_the_chart_parses():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(FULL_VALUES)}
    spec = ClusterSpec.model_validate(yaml.safe_load(docs[("ConfigMap", "demo-spec")]["data"]["cluster.yaml"]))
    assert spec.registry == "redis://demo-redis:6379/0" and spec.tls.enabled and spec.tls.ca
    assert (spec.prefill.node_resource, spec.decode.node_resource) == ("prefill_pool", "decode_pool")
    assert spec.prefill.max_replicas == 9 and spec.prefill.num_gpus == 1
    assert (spec.prefill.cost_per_hour, spec.decode.cost_per_hour) == (2.99, 0.0)  # the controller's $/1M tokens
    assert spec.engine.quantization == "fp8" and spec.engine.enable_chunked_prefill is True
    assert spec.prefill.engine == {"max_num_batched_tokens": 16384, "kv_offloading_size": 1.5} and spec.decode.engine == {}
    assert spec.prefill.kv.tier_dir == "/var/lib/pdcluster/kv-tier" and spec.decode.kv.tier_dir == ""
    # A second model, co-located on the decode node group; the routers read it from the registry.
    small = spec.model_clusters()[1]
    assert small.name == "demo-small" and small.engine.model == "/models/small" and small.prefill.replicas == 0
    assert small.decode.node_resource == "decode_pool" and small.router_config().vllm_args == ["--served-model-name", "small"]
    head = docs[("RayCluster", "demo")]["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    controller = next(c for c in head if c["name"] == "controller")
    args = build_parser().parse_args(controller["command"][1:])
    assert args.no_router and [c.rsplit("/", 1)[-1] for c in args.config] == ["cluster.yaml"]
    router = docs[("Deployment", "demo-router")]["spec"]["template"]["spec"]["containers"][0]
    config = parse_router_args(router["args"])
    assert config.registry == spec.registry and config.tls.enabled and config.host == "0.0.0.0"
    assert config.vllm_args == ["--served-model-name", "llama", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    # Tenants from their Secret; usage billed at the pools' rates.
    assert config.tenants_file == "/etc/pdcluster/tenants/tenants.yaml" and config.response_cache.ttl_s == 3600
    assert {"name": "tenants", "mountPath": "/etc/pdcluster/tenants", "readOnly": True} in router["volumeMounts"]
    volumes = docs[("Deployment", "demo-router")]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tenants", "secret": {"secretName": "pd-tenants"}} in volumes
    assert (config.cost_per_hour.prefill, config.cost_per_hour.decode) == (2.99, 0.0)
    # The profile travels in the ConfigMap; router and controller read it where the config is mounted.
    profile = EngineProfile.model_validate_json(docs[("ConfigMap", "demo-spec")]["data"]["profile.json"])
    assert profile.name == "cpu1-bench-llama-v1-s0"
    assert config.profile == spec.router.profile == "/etc/pdcluster/config/profile.json"
    assert config.slo == spec.router.slo and config.slo.ttft_ms == 2000 and config.slo.itl_ms == 50
    assert spec.autoscaling.signal == "slo" and not spec.autoscaling.role_switching  # the pools' engines differ here
    assert router["readinessProbe"]["httpGet"]["path"] == "/health"
    assert router["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
