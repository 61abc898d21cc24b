"""The cluster controller (a Ray actor): keeps each pool at its target replica count,
replaces dead or hung workers, runs the autoscaler, and answers membership and status.

Each replica is a WorkerActor in its own placement group (one STRICT_PACK bundle with the
pool's CPUs, GPUs and node resource), so Ray puts prefill and decode on their node types
and its autoscaler adds nodes of the right type for pending replicas.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

import grpc

from cluster.autoscaler import Autoscaler, ScalingDecision, pool_load
from cluster.cluster_spec import ClusterSpec
from cluster.worker_config import engine_flags, tls_flags
from kv_transfer.tls import open_channel
from protos import worker_pb2, worker_pb2_grpc

logger = logging.getLogger("pdcluster.controller")

ROLES = ("prefill", "decode")
STATS_TIMEOUT_S = 3.0
READY_TIMEOUT_S = 900.0


@dataclass(eq=False)
class Replica:
    id: str
    role: str
    actor: object
    placement_group: object
    ready: asyncio.Future
    state: str = "starting"  # starting -> ready -> draining
    info: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    failed_checks: int = 0
    stats: worker_pb2.WorkerStats | None = None
    channel: grpc.aio.Channel | None = None

    def describe(self) -> dict:
        s = self.stats
        return {
            "id": self.id, "role": self.role, "state": self.state,
            "address": self.info.get("address", ""), "node": self.info.get("node", ""), "pid": self.info.get("pid", 0),
            "running": s.running if s else 0, "queued": s.queued if s else 0,
            "free_kv_blocks": s.free_kv_blocks if s else 0, "total_kv_blocks": s.total_kv_blocks if s else 0,
            "age_s": round(time.time() - self.created, 1),
        }


class ClusterController:
    def __init__(self, spec_json: str) -> None:
        logging.basicConfig(level=logging.INFO)
        self.spec = ClusterSpec.model_validate_json(spec_json)
        self.targets = {role: self.spec.pool(role).replicas for role in ROLES}
        self.replicas: list[Replica] = []
        self.autoscaler = Autoscaler(self.spec.autoscaling)
        self.decisions: collections.deque[ScalingDecision] = collections.deque(maxlen=50)
        self.heals: collections.deque[dict] = collections.deque(maxlen=50)
        self._open_heals: list[dict] = []
        self._last_autoscale = 0.0
        self._task: asyncio.Task | None = None
        self.metrics_address = ""
        self.decision_counts: collections.Counter = collections.Counter()  # (role, "up"|"down")
        self.heal_counts: collections.Counter = collections.Counter()  # role

    # -- what others ask --------------------------------------------------------------

    async def start(self) -> None:
        import ray
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(_ControllerCollector(self))
        host = ray.util.get_node_ip_address()
        server, _ = start_http_server(self.spec.controller_metrics_port, addr=host, registry=registry)
        self.metrics_address = f"{host}:{server.server_port}"
        self._task = asyncio.create_task(self._run())

    async def members(self) -> list[str]:
        """Addresses of the replicas that take new requests."""
        return [r.info["address"] for r in self.replicas if r.state == "ready"]

    async def status(self) -> dict:
        return {
            "name": self.spec.name,
            "metrics_address": self.metrics_address,
            "pools": {
                role: {
                    "target": self.targets[role],
                    "min": self.spec.pool(role).min_replicas,
                    "max": self.spec.pool(role).max_replicas,
                    "ready": sum(r.role == role and r.state == "ready" for r in self.replicas),
                    "resources": self.spec.pool(role).bundle(),
                }
                for role in ROLES
            },
            "replicas": [r.describe() for r in self.replicas],
            "autoscaling": self.spec.autoscaling.enabled,
            "decisions": [asdict(d) for d in self.decisions],
            "heals": list(self.heals),
        }

    async def scale(self, role: str, replicas: int) -> None:
        """Set a pool's target by hand (within its min/max)."""
        pool = self.spec.pool(role)
        self.targets[role] = max(pool.min_replicas, min(pool.max_replicas, replicas))

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(self._remove(r, drain=True) for r in list(self.replicas)))

    # -- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._reconcile()
            except Exception:  # one bad round must not stop healing
                logger.exception("reconcile failed")
            await asyncio.sleep(self.spec.health_interval_s)

    async def _reconcile(self) -> None:
        await asyncio.gather(*(self._check(r) for r in list(self.replicas)))
        if self.spec.autoscaling.enabled and time.monotonic() - self._last_autoscale >= self.spec.autoscaling.interval_s:
            self._last_autoscale = time.monotonic()
            self._autoscale()
        for role in ROLES:
            active = [r for r in self.replicas if r.role == role and r.state != "draining"]
            for _ in range(self.targets[role] - len(active)):
                self._add(role)
            surplus = len(active) - self.targets[role]
            if surplus > 0:
                # Shrink: drop replicas still starting first, then the least busy ready ones.
                order = sorted(active, key=lambda r: (r.state == "ready", r.stats.running if r.stats else 0))
                for replica in order[:surplus]:
                    asyncio.create_task(self._remove(replica, drain=True))

    def _autoscale(self) -> None:
        for role in ROLES:
            ready = [r for r in self.replicas if r.role == role and r.state == "ready" and r.stats]
            load = pool_load(role, [r.stats for r in ready], self.spec.autoscaling)
            decision = self.autoscaler.decide(role, self.spec.pool(role), self.targets[role], len(ready), load)
            if decision is not None:
                logger.info("autoscaler: %s %d -> %d (%s)", role, decision.from_replicas, decision.to_replicas, decision.reason)
                self.decisions.append(decision)
                self.decision_counts[(role, "up" if decision.to_replicas > decision.from_replicas else "down")] += 1
                self.targets[role] = decision.to_replicas

    async def _check(self, replica: Replica) -> None:
        if replica.state == "starting":
            if not replica.ready.done():
                return
            if replica.ready.exception() is not None:
                logger.error("%s replica %s failed to start: %s", replica.role, replica.id, replica.ready.exception())
                await self._remove(replica, drain=False)
                return
            replica.info = replica.ready.result()
            replica.channel = open_channel(replica.info["address"], self.spec.tls)
            replica.state = "ready"
            self._close_heal(replica)
            logger.info("%s replica %s ready at %s", replica.role, replica.id, replica.info["address"])
        if replica.state != "ready":
            return
        try:
            replica.stats = await worker_pb2_grpc.WorkerStub(replica.channel).Stats(worker_pb2.StatsRequest(), timeout=STATS_TIMEOUT_S)
            replica.failed_checks = 0
        except grpc.aio.AioRpcError:
            replica.failed_checks += 1
        exited = await self._exit_code(replica)
        if exited is not None or replica.failed_checks >= self.spec.unhealthy_after:
            reason = f"exited with {exited}" if exited is not None else f"{replica.failed_checks} failed health checks"
            logger.warning("%s replica %s at %s is down (%s): replacing it", replica.role, replica.id, replica.info.get("address"), reason)
            self._open_heals.append({"role": replica.role, "replaced": replica.id, "reason": reason, "detected_at": time.time()})
            await self._remove(replica, drain=False)

    async def _exit_code(self, replica: Replica) -> int | None:
        try:
            return await asyncio.wait_for(replica.actor.exit_code.remote(), STATS_TIMEOUT_S)
        except asyncio.TimeoutError:
            return None
        except Exception:  # the actor itself is gone (its node died)
            return -1

    def _close_heal(self, replica: Replica) -> None:
        heal = next((h for h in self._open_heals if h["role"] == replica.role), None)
        if heal is not None:
            self._open_heals.remove(heal)
            heal.update(replacement=replica.id, ready_at=time.time(), seconds=round(time.time() - heal["detected_at"], 1))
            self.heals.append(heal)
            self.heal_counts[replica.role] += 1
            logger.info("healed %s pool in %.1fs", replica.role, heal["seconds"])

    # -- replicas ---------------------------------------------------------------------

    def _add(self, role: str) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.worker_actor import WorkerActor

        pool = self.spec.pool(role)
        replica_id = f"{role}-{uuid.uuid4().hex[:8]}"
        bundle = pool.bundle()
        pg = placement_group([bundle], strategy="STRICT_PACK", name=f"{self.spec.name}-{replica_id}")
        engine = self.spec.engine.model_copy(update={"tensor_parallel_size": pool.tensor_parallel_size})
        args = [*engine_flags(engine), "--worker-id", replica_id, "--kv-transport", pool.kv_transport,
                "--cluster-name", self.spec.name, *tls_flags(self.spec.tls), *pool.extra_args]
        if self.spec.registry:
            args += ["--registry", self.spec.registry]
        actor = ray.remote(WorkerActor).options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            max_concurrency=4, name=f"{self.spec.name}-{replica_id}", namespace="pdcluster",
        ).remote(role, args)
        ready = asyncio.ensure_future(actor.wait_ready.remote(READY_TIMEOUT_S))
        self.replicas.append(Replica(replica_id, role, actor, pg, ready))
        logger.info("starting %s replica %s (%s)", role, replica_id, bundle)

    async def _remove(self, replica: Replica, drain: bool) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if replica.state == "draining" and drain:
            return
        replica.state = "draining"
        if drain:  # SIGTERM: the worker finishes its running requests, then exits
            with contextlib.suppress(Exception):
                await asyncio.wait_for(replica.actor.stop.remote(), 60)
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(replica.actor.stop.remote(), 10)
        with contextlib.suppress(Exception):
            ray.kill(replica.actor)
        with contextlib.suppress(Exception):
            remove_placement_group(replica.placement_group)
        if replica.channel is not None:
            await replica.channel.close()
        if replica in self.replicas:
            self.replicas.remove(replica)


class _ControllerCollector:
    """Pools, autoscaler decisions and heals as Prometheus metrics, read at scrape time."""

    def __init__(self, controller: ClusterController) -> None:
        self._c = controller

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self._c
        target = GaugeMetricFamily("pdcluster_pool_target_replicas", "Replicas the pool should have", labels=["role"])
        ready = GaugeMetricFamily("pdcluster_pool_ready_replicas", "Replicas serving", labels=["role"])
        decisions = CounterMetricFamily("pdcluster_autoscaler_decisions", "Autoscaler decisions", labels=["role", "direction"])
        heals = CounterMetricFamily("pdcluster_controller_heals", "Replicas replaced after a failure", labels=["role"])
        for role in ROLES:
            target.add_metric([role], c.targets[role])
            ready.add_metric([role], sum(r.role == role and r.state == "ready" for r in c.replicas))
            for direction in ("up", "down"):
                decisions.add_metric([role, direction], c.decision_counts[(role, direction)])
            heals.add_metric([role], c.heal_counts[role])
        yield from (target, ready, decisions, heals)
