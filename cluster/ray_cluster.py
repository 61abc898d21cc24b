"""Connecting to Ray (or starting a local instance) and to the cluster controller."""

from __future__ import annotations

import os
import sys

from pdcluster.cluster.cluster_spec import ClusterSpec
from pdcluster.cluster.controller import ClusterController
from pdcluster.cluster.ray_launcher import NAMESPACE
from pdcluster.common.ports import is_loopback

_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect_ray(spec: ClusterSpec) -> None:
    """Join `spec.ray_address`, or start a local Ray with room for every pool at its max."""
    if not spec.ray_address and is_loopback(spec.bind_host()):
        _single_machine_mode()
    import ray

    if spec.ray_address:
        ray.init(address=spec.ray_address, namespace=NAMESPACE, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only instance
    pools = [pool for model in spec.model_clusters() for pool in (model.prefill, model.decode)]
    # Logical CPUs: one engine per pool replica even where the machine has fewer cores.
    cpus = max(os.cpu_count() or 1, int(sum(p.num_cpus * p.max_replicas for p in pools)) + 1)
    resources: dict[str, float] = {}
    for p in pools:
        if p.node_resource:
            resources[p.node_resource] = resources.get(p.node_resource, 0) + p.max_replicas
    # "local": never the cluster RAY_ADDRESS or a dead head's leftover address file names
    ray.init(address="local", num_cpus=cpus, resources=resources, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)


def _single_machine_mode() -> None:
    """Ray's single-machine mode: its node address becomes 127.0.0.1 and every Ray server (GCS,
    raylet, object manager, actors) listens there instead of on all interfaces. Ray reads the
    switch when imported, so it must be set first."""
    if "ray" in sys.modules and os.environ.get(_SINGLE_MACHINE) != "0":
        raise RuntimeError(f"Ray was imported before {_SINGLE_MACHINE}=0 was set")
    os.environ[_SINGLE_MACHINE] = "0"


def _gcs_host(address: str) -> str:
    """The host of a Ray address; for `auto`, the node address of the GCS running on this machine."""
    if address != "auto":
        return address.removeprefix("ray://").rsplit(":", 1)[0]
    import psutil

    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "gcs_server":
            for arg in proc.info["cmdline"] or ():
                if arg.startswith("--node-ip-address="):
                    return arg.split("=", 1)[1]
    return ""


def controller_name(cluster_name: str) -> str:
    return f"{cluster_name}-controller"


class ControllerActor(ClusterController):
    """The controller as a Ray actor. Ray runs this again after a crash (max_restarts); each
    life starts by adopting the replicas still running, then resumes healing and scaling."""

    async def __init__(self, spec_json: str) -> None:  # type: ignore[misc]  # Ray awaits an async actor's constructor
        super().__init__(spec_json)
        await self.start()


def start_controller(spec: ClusterSpec):
    import ray

    controller = (
        ray.remote(ControllerActor)
        .options(
            name=controller_name(spec.name),
            namespace=NAMESPACE,
            max_restarts=-1,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},  # on the head: a fixed home for its metrics port
        )
        .remote(spec.model_dump_json())
    )
    ray.get(controller.status.remote())  # type: ignore[attr-defined]  # construction (and start) done
    return controller


def find_controller(cluster_name: str, address: str):
    address = address or "auto"
    if is_loopback(_gcs_host(address)):  # a loopback-only local cluster: join it the same way
        _single_machine_mode()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    return ray.get_actor(controller_name(cluster_name), namespace=NAMESPACE)


def model_controllers(cluster_name: str) -> list:
    """The controllers of a cluster's other models (`<name>-<model>`, from the spec's
    `models:`), once `find_controller` has joined Ray."""
    import ray

    names = sorted(n for n in ray.util.list_named_actors() if n.startswith(f"{cluster_name}-") and n != controller_name(cluster_name))
    return [ray.get_actor(n, namespace=NAMESPACE) for n in names if n.endswith("-controller")]
