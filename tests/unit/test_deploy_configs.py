"""The deployment files are valid: the Ray cluster-launcher YAMLs pass Ray's own config
validation, and the cluster specs load into the typed ClusterSpec."""

from __future__ import annotations

import argparse
import copy
import os

import jsonschema
import pytest
import yaml

from pdcluster.cluster.cluster_spec import ClusterSpec, add_cluster_flags, load_cluster_spec

from tests.support.paths import DEPLOY


def ray_validate(config: dict) -> dict:
    """What `ray up` does before it launches anything: fill in defaults, check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(name: str) -> dict:
    with open(os.path.join(DEPLOY, name)) as f:
        return yaml.safe_load(f)


def test_aws_cluster_yaml_passes_ray_validation():
    prepared = ray_validate(load("ray/aws.yaml"))
    types = prepared["available_node_types"]
    assert types["prefill_gpu"]["resources"]["prefill_pool"] > 0
    assert types["decode_gpu"]["resources"]["decode_pool"] > 0
    assert types["prefill_gpu"]["node_config"]["InstanceType"] != types["decode_gpu"]["node_config"]["InstanceType"]
    assert all(types[t]["max_workers"] >= types[t]["min_workers"] for t in ("prefill_gpu", "decode_gpu"))
    # Each node type carries its replicas' price, the figure the spec gives the controller.
    spec = ClusterSpec.model_validate(load("cluster.gpu.yaml"))
    assert float(types["prefill_gpu"]["labels"]["pdcluster-cost-per-hour"]) == spec.prefill.cost_per_hour > 0
    assert float(types["decode_gpu"]["labels"]["pdcluster-cost-per-hour"]) == spec.decode.cost_per_hour > 0


def test_local_cluster_yaml_passes_ray_validation():
    prepared = ray_validate(load("ray/local.yaml"))
    assert prepared["provider"]["type"] == "local"
    assert any("--resources" in c for c in prepared["worker_start_ray_commands"])
    # The machines get the checkout `ray up` runs from, not a clone of some URL.
    assert prepared["file_mounts"] == {"~/pdcluster": "."} and not any("git clone" in c for c in prepared["setup_commands"])


def test_the_labs_cluster_yaml_is_local_yaml_for_its_hosts(tmp_path):
    from pdcluster.lab.lab_spec import LabSpec
    from pdcluster.lab.lab_ssh import cluster_config

    spec = LabSpec(name="lab1", prefill_hosts=2, decode_hosts=1, router_hosts=1, ssh=True, ray=False)
    config = cluster_config(spec, tmp_path)
    prepared = ray_validate(config)
    assert prepared["provider"] == {
        "type": "local",
        "head_ip": "10.77.0.1",
        "worker_ips": ["10.77.0.11", "10.77.0.12", "10.77.0.21", "10.77.0.31"],
    }
    assert prepared["auth"] == {"ssh_user": "root", "ssh_private_key": str(tmp_path / "ssh" / "id_ed25519")}
    # local.yaml's own start commands, as written; only the install goes (the hosts share this checkout).
    local = load("ray/local.yaml")
    assert config["head_start_ray_commands"] == local["head_start_ray_commands"]
    assert config["worker_start_ray_commands"] == local["worker_start_ray_commands"]
    assert config["setup_commands"] == [c for c in local["setup_commands"] if "install.sh" not in c] != local["setup_commands"]
    assert config["file_mounts"] == {}


def test_ray_validation_catches_a_broken_config():
    broken = load("ray/aws.yaml")
    broken["available_node_types"]["prefill_gpu"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="'many' is not of type 'integer'"):
        ray_validate(broken)


@pytest.mark.parametrize("name", ["cluster.example.yaml", "cluster.gpu.yaml"])
def test_cluster_specs_load(name):
    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    spec = load_cluster_spec(parser.parse_args(["--config", os.path.join(DEPLOY, name), "--decode", "3"]))
    assert spec.prefill.node_resource == "prefill_pool" and spec.decode.node_resource == "decode_pool"
    assert spec.decode.replicas == 3 and spec.decode.max_replicas >= 3
    assert spec.prefill.bundle()["prefill_pool"] == 1.0


def test_cluster_spec_refuses_unknown_fields():
    with pytest.raises(ValueError):
        ClusterSpec.model_validate({"prefill": {"replica": 2}})
