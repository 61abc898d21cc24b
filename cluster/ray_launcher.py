"""Replicas on Ray: each one a WorkerActor in its own placement group (one STRICT_PACK bundle
with the pool's CPUs, GPUs and node resource), so Ray puts prefill and decode on their node
types and its autoscaler adds nodes of the right type for pending replicas. Both are detached
and named `{cluster}-{replica_id}`: they outlive a crashed controller, whose next life finds
them by name. Also the gRPC probe the controller checks workers with."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import grpc

from pdcluster.cluster.cluster_spec import PoolSpec
from pdcluster.cluster.replica_launcher import REPLICA_ID_PREFIX, LiveReplica, Process, ProcessReport
from pdcluster.cluster.worker_actor import WorkerActor
from pdcluster.common.tls import TLSFiles, open_channel
from pdcluster.common.worker_auth import token_metadata
from pdcluster.common.worker_record import Role, WorkerRecord
from pdcluster.protos import worker_pb2, worker_pb2_grpc
from pdcluster.worker.config import WorkerConfig

NAMESPACE = "pdcluster"
STATS_TIMEOUT_S = 3.0
SWITCH_TIMEOUT_S = 90.0  # the worker's drain (30 s at most) and a margin
DRAIN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass(eq=False)
class RayReplica:
    actor: Any  # a Ray actor handle: its methods' .remote() are resolved at run time
    placement_group: Any


class RayReplicaLauncher:
    def __init__(self, cluster_name: str) -> None:
        self._prefix = f"{cluster_name}-"

    def node_address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def launch(self, config: WorkerConfig, pool: PoolSpec) -> RayReplica:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        name = self._prefix + config.worker_id
        bundle = pool.bundle()
        pg = placement_group([bundle], strategy="STRICT_PACK", name=name, lifetime="detached")
        actor = (
            ray.remote(WorkerActor)
            .options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
                max_concurrency=4,
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
            )
            .remote(config.model_dump_json(), pool.extra_args)
        )
        return RayReplica(actor, pg)

    async def wait_ready(self, handle: RayReplica, timeout_s: float) -> WorkerRecord:
        from ray.exceptions import RayTaskError

        try:
            return WorkerRecord.model_validate_json(await handle.actor.wait_ready.remote(timeout_s))
        except RayTaskError as e:  # the worker's own error (its log's path and last lines), not Ray's wrapper
            raise (e.cause or e) from None

    async def process(self, handle: RayReplica, ask_worker: bool) -> ProcessReport:
        try:
            state, code = await asyncio.wait_for(handle.actor.process.remote(ask_worker, STATS_TIMEOUT_S), 2 * STATS_TIMEOUT_S)
        except TimeoutError:
            return ProcessReport(Process.NODE_UNREACHABLE)
        except Exception:  # the actor itself is gone (Ray ruled its node dead)
            return ProcessReport(Process.EXITED, -1)
        return ProcessReport(Process(state), code)

    async def live_replicas(self) -> list[LiveReplica]:
        import ray
        from ray.util.placement_group import get_placement_group, remove_placement_group

        actors = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
        found: list[LiveReplica] = []
        for info in ray.util.placement_group_table().values():
            name = info["name"]
            replica_id = name.removeprefix(self._prefix)
            if not name.startswith(self._prefix) or not replica_id.startswith(REPLICA_ID_PREFIX) or info["state"] == "REMOVED":
                continue
            pg = get_placement_group(name)
            if name in actors:
                actor = ray.get_actor(name, namespace=NAMESPACE)
                role = Role(await asyncio.wait_for(actor.started_role.remote(), STATS_TIMEOUT_S))
                found.append(LiveReplica(replica_id, role, RayReplica(actor, pg)))
            else:  # its actor died with the controller that was starting it
                remove_placement_group(pg)
        return found

    async def stop(self, handle: RayReplica, drain: bool) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.actor.stop.remote(drain), DRAIN_TIMEOUT_S if drain else STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            ray.kill(handle.actor)
        with contextlib.suppress(Exception):
            remove_placement_group(handle.placement_group)


class GrpcWorkerProbe:
    """Calls each worker's `Stats` over one kept channel per worker."""

    def __init__(self, tls: TLSFiles, token: str) -> None:
        self._tls = tls
        self._metadata = token_metadata(token)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, record: WorkerRecord) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(record.address)
        if channel is None:
            channel = self._channels[record.address] = open_channel(record.address, self._tls)
        return worker_pb2_grpc.WorkerStub(channel)

    async def stats(self, record: WorkerRecord) -> worker_pb2.WorkerStats:
        return await self._stub(record).Stats(worker_pb2.StatsRequest(), timeout=STATS_TIMEOUT_S, metadata=self._metadata)

    async def switch_role(self, record: WorkerRecord, role: Role) -> None:
        request = worker_pb2.SwitchRoleRequest(role=role)
        await self._stub(record).SwitchRole(request, timeout=SWITCH_TIMEOUT_S, metadata=self._metadata)

    async def forget(self, record: WorkerRecord) -> None:
        channel = self._channels.pop(record.address, None)
        if channel is not None:
            await channel.close()
