"""Connecting to Ray (or starting a local instance) and to the cluster controller."""

from __future__ import annotations

import os

from pdcluster.cluster.cluster_spec import ClusterSpec

NAMESPACE = "pdcluster"


def connect_ray(spec: ClusterSpec) -> None:
    """Join `spec.ray_address`, or start a local Ray with room for every pool at its max."""
    import ray

    if spec.ray_address:
        ray.init(address=spec.ray_address, namespace=NAMESPACE, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only instance
    pools = [spec.prefill, spec.decode]
    # Logical CPUs: one engine per pool replica even where the machine has fewer cores.
    cpus = max(os.cpu_count() or 1, int(sum(p.num_cpus * p.max_replicas for p in pools)) + 1)
    resources: dict[str, float] = {}
    for p in pools:
        if p.node_resource:
            resources[p.node_resource] = resources.get(p.node_resource, 0) + p.max_replicas
    ray.init(num_cpus=cpus, resources=resources, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)


def controller_name(cluster_name: str) -> str:
    return f"{cluster_name}-controller"


def start_controller(spec: ClusterSpec):
    import ray

    from pdcluster.cluster.controller import ClusterController

    controller = (
        ray.remote(ClusterController)
        .options(
            name=controller_name(spec.name),
            namespace=NAMESPACE,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},  # on the head: a fixed home for its metrics port
        )
        .remote(spec.model_dump_json())
    )
    ray.get(controller.start.remote())
    return controller


def find_controller(cluster_name: str, address: str):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    return ray.get_actor(controller_name(cluster_name), namespace=NAMESPACE)
