"""The cluster controller: keeps each pool at its target replica count, replaces dead or
hung workers, runs the autoscaler, and answers membership and status.

It decides; a `ReplicaLauncher` acts (Ray in production, a fake in tests) and a
`WorkerProbe` reads each worker's load. As a Ray actor it is created with the spec alone
and uses the Ray launcher and the gRPC probe.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from pdcluster.cluster.autoscaler import Autoscaler, ScalingDecision, SLOLoad, pool_load
from pdcluster.cluster.cluster_spec import ClusterSpec, PoolSpec
from pdcluster.cluster.cluster_status import ClusterStatus, Heal, PoolStatus, ReplicaStatus, StartFailure
from pdcluster.cluster.pool_cost import PoolCostMeter
from pdcluster.cluster.reconcile_policy import (
    Action,
    Drain,
    ReplicaState,
    ReplicaView,
    Start,
    Switch,
    converge,
    replacement_reason,
    scale,
)
from pdcluster.cluster.replica_launcher import REPLICA_ID_PREFIX, ReplicaHandle, ReplicaLauncher, WorkerProbe
from pdcluster.common.engine_profile import load_profile
from pdcluster.common.logs import configure_logging
from pdcluster.common.periodic import cancel_all, run_periodically
from pdcluster.common.registry import RedisRegistry
from pdcluster.common.worker_record import ROLES, Role, WorkerRecord, other_role
from pdcluster.protos import worker_pb2
from pdcluster.worker.config import ENGINE_ARGS_CHECKED

logger = logging.getLogger("pdcluster.controller")

READY_TIMEOUT_S = 900.0
TOKEN_REPUBLISH_S = 5.0
ADOPT_READY_WAIT_S = 30.0  # a running worker answers at once; one still loading keeps starting


@dataclass(eq=False)
class Replica:
    id: str
    role: Role
    handle: ReplicaHandle
    ready: asyncio.Future  # resolves to the WorkerRecord once the worker serves
    state: ReplicaState = ReplicaState.STARTING  # -> ready (<-> switching, to the other role) -> draining
    record: WorkerRecord | None = None
    created: float = field(default_factory=time.time)  # when it was decided to start it (or adopted)
    failed_checks: int = 0
    cut_off: str = ""  # why it is kept though the controller cannot reach it
    outdated: bool = False  # a rolling restart replaces it
    stats: worker_pb2.WorkerStats | None = None

    def describe(self) -> ReplicaStatus:
        s, r = self.stats, self.record
        return ReplicaStatus(
            id=self.id,
            role=self.role,
            state=self.state.value,
            address=r.address if r else "",
            node=r.node if r else "",
            pid=r.pid if r else 0,
            running=s.running if s else 0,
            queued=s.queued if s else 0,
            free_kv_blocks=s.free_kv_blocks if s else 0,
            total_kv_blocks=s.total_kv_blocks if s else 0,
            age_s=round(time.time() - self.created, 1),
            decided_at=self.created,
            start=r.start if r else None,
            cut_off=self.cut_off,
        )


class ClusterController:
    def __init__(self, spec_json: str, launcher: ReplicaLauncher | None = None, probe: WorkerProbe | None = None) -> None:
        configure_logging()
        # Checked by vLLM where it was made; checking again would import vLLM here (seconds).
        self.spec = ClusterSpec.model_validate_json(spec_json, context={ENGINE_ARGS_CHECKED: True})
        if launcher is None or probe is None:  # the Ray actor: replicas on Ray, probed over gRPC
            from pdcluster.cluster.ray_launcher import GrpcWorkerProbe, RayReplicaLauncher

            launcher = launcher or RayReplicaLauncher(self.spec.name)
            probe = probe or GrpcWorkerProbe(self.spec.tls, self.spec.auth_token)
        self.launcher, self.probe = launcher, probe
        self.targets = {role: self.spec.pool(role).replicas for role in ROLES}
        self.replicas: list[Replica] = []
        self.autoscaler = Autoscaler(self.spec.autoscaling)
        self.slo_load = None
        if self.spec.autoscaling.signal == "slo":
            profile = load_profile(self.spec.router.profile)
            self.slo_load = SLOLoad(profile, self.spec.router.slo, self.spec.autoscaling.decode_target_kv_usage)
        self.decisions: collections.deque[ScalingDecision] = collections.deque(maxlen=50)
        self.heals: collections.deque[Heal] = collections.deque(maxlen=50)
        self.start_failures: collections.deque[StartFailure] = collections.deque(maxlen=50)
        # Per pool: replicas that failed to start since the last one that started. A cause that
        # repeats (a bad engine argument) fails every start; `pdcluster serve` gives up on it.
        self.failed_starts_in_a_row: collections.Counter[Role] = collections.Counter()
        self._open_heals: list[Heal] = []
        self._last_autoscale = 0.0
        self._tasks: list[asyncio.Task] = []  # its periodic loops
        self._actions: list[asyncio.Task] = []  # drains and switches under way
        self._registry: RedisRegistry | None = None
        self.metrics_address = ""
        self.decision_counts: collections.Counter = collections.Counter()  # (role, "up"|"down")
        self.heal_counts: collections.Counter = collections.Counter()  # role
        self.switch_counts: collections.Counter = collections.Counter()  # (from role, to role), switches completed
        self.cost = PoolCostMeter()

    # -- what others ask --------------------------------------------------------------

    async def start(self, serve_metrics: bool = True) -> None:
        await self._adopt_live_replicas()
        if serve_metrics:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry()
            registry.register(_ControllerCollector(self))
            host = self.spec.bind_host() or self.launcher.node_address()
            server, _ = start_http_server(self.spec.controller_metrics_port, addr=host, registry=registry)
            self.metrics_address = f"{host}:{server.server_port}"
        self._tasks.append(run_periodically(self.reconcile, self.spec.health_interval_s, logger))
        if self.spec.registry and self.spec.auth_token:
            # For routers that join through the registry; again every few seconds, so a Redis
            # that restarted empty has it back soon. Its own loop: Redis down never stops healing.
            self._registry = RedisRegistry(self.spec.registry, self.spec.name)
            self._tasks.append(run_periodically(lambda: self._registry.publish_token(self.spec.auth_token), TOKEN_REPUBLISH_S, logger))

    async def _adopt_live_replicas(self) -> None:
        """After a crash: take over the replicas an earlier life started, without restarting
        them, and serve membership only once the ready ones are known again. A replica's role
        is the one its worker reports (a switch outlives the controller that made it), so the
        pools' targets are set only after the first probe."""
        for live in await self.launcher.live_replicas():
            ready = asyncio.ensure_future(self.launcher.wait_ready(live.handle, READY_TIMEOUT_S))
            self.replicas.append(Replica(live.replica_id, live.role, live.handle, ready))
        if not self.replicas:
            return
        logger.info("adopting %d live replicas: %s", len(self.replicas), [r.id for r in self.replicas])
        await asyncio.wait([r.ready for r in self.replicas], timeout=ADOPT_READY_WAIT_S)
        await asyncio.gather(*(self._check(r) for r in list(self.replicas)))
        if self.spec.autoscaling.enabled:  # the autoscaler's last targets, as far as the live replicas tell
            for role in ROLES:
                pool = self.spec.pool(role)
                count = sum(r.role == role and r.state != ReplicaState.DRAINING for r in self.replicas)
                self.targets[role] = min(max(count, pool.min_replicas), pool.max_replicas)
        await self.reconcile()  # the first round now: the ready ones become members

    async def members(self) -> list[str]:
        """Addresses of the replicas that take new requests (a switching one drains, then does again)."""
        return [r.record.address for r in self.replicas if r.state in (ReplicaState.READY, ReplicaState.SWITCHING)]

    async def status(self) -> ClusterStatus:
        return ClusterStatus(
            name=self.spec.name,
            metrics_address=self.metrics_address,
            controller_pid=os.getpid(),
            pools={
                role: PoolStatus(
                    target=self.targets[role],
                    min=self.spec.pool(role).min_replicas,
                    max=self.spec.pool(role).max_replicas,
                    ready=self.ready_count(role),
                    outdated=sum(r.role == role and r.outdated and r.state != ReplicaState.DRAINING for r in self.replicas),
                    failed_starts_in_a_row=self.failed_starts_in_a_row[role],
                    resources=self.spec.pool(role).bundle(),
                )
                for role in ROLES
            },
            replicas=[r.describe() for r in self.replicas],
            autoscaling=self.spec.autoscaling.enabled,
            decisions=list(self.decisions),
            heals=list(self.heals),
            start_failures=list(self.start_failures),
        )

    async def switch_replica(self, replica_id: str, role: str) -> str:
        """An operator's move of one ready replica to the other pool; the pools' targets follow
        it. Returns the role it serves once the switch ends (its old one if the switch failed)."""
        replica = next((r for r in self.replicas if r.id == replica_id), None)
        if replica is None or replica.state != ReplicaState.READY:
            raise ValueError(f"no ready replica {replica_id!r}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not self.spec.autoscaling.role_switching:
            raise ValueError("the workers were not started able to switch roles (autoscaling.role_switching)")
        new, old = Role(role), replica.role
        if new == old:
            return old
        if self.targets[new] >= self.spec.pool(new).max_replicas:
            raise ValueError(f"the {new} pool is at its max_replicas ({self.spec.pool(new).max_replicas})")
        self.targets[old] -= 1
        self.targets[new] += 1
        await self._switch(replica, new)
        if replica.role == old:  # refused: the pools stay as they were
            self.targets[old] += 1
            self.targets[new] -= 1
        return replica.role

    async def scale_pool(self, role: str, replicas: int) -> ScalingDecision:
        """An operator's target for one pool, within its min and max: the next rounds start or
        drain replicas to meet it (an enabled autoscaler may move it again later)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        pool = self.spec.pool(Role(role))
        if not pool.min_replicas <= replicas <= pool.max_replicas:
            raise ValueError(
                f"the {role} pool takes {pool.min_replicas} to {pool.max_replicas} replicas (its min_replicas, max_replicas), not {replicas}"
            )
        decision = ScalingDecision(time.time(), role, self.targets[Role(role)], replicas, 0.0, "operator: pdcluster scale")
        if replicas != self.targets[Role(role)]:
            self.targets[Role(role)] = replicas
            self._record(decision)
            self._act(converge(self._views(), self.targets, self._max_replicas()))  # now, not at the next round
        return decision

    async def restart_pool(self, role: str, spec_json: str = "") -> int:
        """An operator's rolling restart: every replica of the pool is replaced, one at a time,
        each drained once its replacement serves (see `converge`). With a spec, a rolling
        upgrade: the replacements (and the pool's later replicas) take its engine and its
        section for the pool. Returns how many will be replaced."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if spec_json:
            new = ClusterSpec.model_validate_json(spec_json, context={ENGINE_ARGS_CHECKED: True})  # checked where it was made
            self.spec = self.spec.model_copy(update={"engine": new.engine, Role(role).value: new.pool(Role(role))})
            logger.info("%s pool upgraded to engine %s", role, self.spec.pool_engine(Role(role)).vllm_args)
        replaced = [r for r in self.replicas if r.role == role and r.state != ReplicaState.DRAINING]
        for replica in replaced:
            replica.outdated = True
        logger.info("rolling restart of the %s pool: %d replicas to replace", role, len(replaced))
        self._act(converge(self._views(), self.targets, self._max_replicas()))
        return len(replaced)

    async def shutdown(self) -> None:
        await cancel_all(self._tasks)
        await asyncio.gather(*self._actions, return_exceptions=True)  # a drain under way ends as it began
        if self._registry is not None:
            await self._registry.close()
        await asyncio.gather(*(self._remove(r, drain=True) for r in list(self.replicas)))

    # -- one round --------------------------------------------------------------------

    def ready_count(self, role: Role) -> int:
        return sum(r.role == role and r.state == ReplicaState.READY for r in self.replicas)

    async def reconcile(self) -> None:
        """One round: check every replica, let the policies decide (the autoscaler's targets and
        switches, then the starts and drains that meet the targets), and carry that out."""
        await asyncio.gather(*(self._check(r) for r in list(self.replicas)))
        ready = [(r.id, r.role, r.stats) for r in self.replicas if r.state == ReplicaState.READY and r.stats is not None]
        self.cost.observe(time.monotonic(), ready, {role: self.spec.pool(role).cost_per_hour for role in ROLES})
        if self.spec.autoscaling.enabled and time.monotonic() - self._last_autoscale >= self.spec.autoscaling.interval_s:
            self._last_autoscale = time.monotonic()
            self.targets, decisions, switches = scale(
                self._views(), self.targets, self._loads(), self.spec.autoscaling, self._pools(), self.autoscaler
            )
            for decision in decisions:
                self._record(decision)
            self._act(switches)
        self._act(converge(self._views(), self.targets, self._max_replicas()))

    def _views(self) -> list[ReplicaView]:
        return [ReplicaView(r.id, r.role, r.state, r.stats.running + r.stats.queued if r.stats else 0, r.outdated) for r in self.replicas]

    def _max_replicas(self) -> dict[Role, int]:
        return {role: self.spec.pool(role).max_replicas for role in ROLES}

    def _pools(self) -> dict[Role, PoolSpec]:
        return {role: self.spec.pool(role) for role in ROLES}

    def _loads(self) -> dict[Role, float]:
        def stats(role: Role) -> list[worker_pb2.WorkerStats]:
            return [r.stats for r in self.replicas if r.role == role and r.state == ReplicaState.READY and r.stats]

        return {role: pool_load(role, stats(role), self.spec.autoscaling, self.slo_load) for role in ROLES}

    def _act(self, actions: list[Action]) -> None:
        """Carry out the policies' actions: the one place replicas are started, drained or switched."""
        by_id = {r.id: r for r in self.replicas}
        for action in actions:
            match action:
                case Start(role):
                    self._add(role)
                case Drain(replica_id):
                    self._spawn(self._remove(by_id[replica_id], drain=True))
                case Switch(replica_id, to):
                    self._switch(by_id[replica_id], to)

    def _spawn(self, work) -> asyncio.Task:
        """Run `work` beside the rounds, keeping a reference until it ends (shutdown awaits it)."""
        self._actions = [t for t in self._actions if not t.done()]
        self._actions.append(asyncio.create_task(work))
        return self._actions[-1]

    def _record(self, decision: ScalingDecision) -> None:
        logger.info("autoscaler: %s %d -> %d (%s)", decision.role, decision.from_replicas, decision.to_replicas, decision.reason)
        self.decisions.append(decision)
        self.decision_counts[(decision.role, "up" if decision.to_replicas > decision.from_replicas else "down")] += 1

    def _switch(self, replica: Replica, role: Role) -> asyncio.Task:
        """Move a ready replica to `role`'s pool: it counts there at once (nothing new starts),
        drains, and serves the new role. A failed switch leaves it in its old pool; the next
        rounds then start and drain replicas to meet the targets as without switching."""
        old = replica.role
        replica.role, replica.state = role, ReplicaState.SWITCHING

        async def switch() -> None:
            try:
                await self.probe.switch_role(replica.record, role)
            except Exception as e:
                logger.warning("replica %s did not switch from %s to %s (%s): it stays %s", replica.id, old, role, e, old)
                replica.role = old
            else:
                self.switch_counts[(old, role)] += 1
            if replica.state == ReplicaState.SWITCHING:
                replica.state = ReplicaState.READY

        return self._spawn(switch())

    async def _check(self, replica: Replica) -> None:
        if replica.state == ReplicaState.STARTING:
            if not replica.ready.done():
                return
            if replica.ready.exception() is not None:
                logger.error("%s replica %s failed to start: %s", replica.role, replica.id, replica.ready.exception())
                self.start_failures.append(StartFailure(replica.role, replica.id, str(replica.ready.exception()), time.time()))
                self.failed_starts_in_a_row[replica.role] += 1
                await self._remove(replica, drain=False)
                return
            replica.record = replica.ready.result()
            replica.state = ReplicaState.READY
            self.failed_starts_in_a_row[replica.role] = 0
            self._close_heal(replica)
            logger.info("%s replica %s ready at %s", replica.role, replica.id, replica.record.address)
        if replica.state != ReplicaState.READY:
            return
        try:
            replica.stats = await self.probe.stats(replica.record)
            if replica.stats.role and replica.stats.role != replica.role:  # switched by an earlier life of the controller
                replica.role = Role(replica.stats.role)
        except Exception:
            replica.failed_checks += 1
        else:
            if replica.cut_off:
                logger.info("%s replica %s at %s is reachable again", replica.role, replica.id, replica.record.address)
            replica.failed_checks, replica.cut_off = 0, ""
            return
        # It did not answer: ask its own node whether it runs (and, after enough checks, serves).
        report = await self.launcher.process(replica.handle, ask_worker=replica.failed_checks >= self.spec.unhealthy_after)
        reason, cut_off = replacement_reason(replica.failed_checks, self.spec.unhealthy_after, report)
        if cut_off and not replica.cut_off:
            logger.warning("%s replica %s at %s: %s", replica.role, replica.id, replica.record.address, cut_off)
        replica.cut_off = cut_off
        if reason:
            logger.warning("%s replica %s at %s is down (%s): replacing it", replica.role, replica.id, replica.record.address, reason)
            self._open_heals.append(Heal(replica.role, replica.id, reason, time.time()))
            await self._remove(replica, drain=False)

    def _close_heal(self, replica: Replica) -> None:
        heal = next((h for h in self._open_heals if h.role == replica.role), None)
        if heal is not None:
            self._open_heals.remove(heal)
            heal.replacement, heal.ready_at = replica.id, time.time()
            heal.seconds = round(heal.ready_at - heal.detected_at, 1)
            self.heals.append(heal)
            self.heal_counts[replica.role] += 1
            logger.info("healed %s pool in %.1fs", replica.role, heal.seconds)

    # -- replicas ---------------------------------------------------------------------

    def _add(self, role: Role) -> None:
        replica_id = f"{REPLICA_ID_PREFIX}{uuid.uuid4().hex[:8]}"
        pool = self.spec.pool(role)
        handle = self.launcher.launch(self.spec.worker_config(role, replica_id), pool)
        ready = asyncio.ensure_future(self.launcher.wait_ready(handle, READY_TIMEOUT_S))
        replica = Replica(replica_id, role, handle, ready)
        self.replicas.append(replica)
        # A member as soon as it serves, not at the next round: a scale-up's new replica takes
        # requests that much sooner.
        ready.add_done_callback(lambda _: self._spawn(self._check(replica)))
        logger.info("starting %s replica %s (%s)", role, replica_id, pool.bundle())

    async def _remove(self, replica: Replica, drain: bool) -> None:
        if replica.state == ReplicaState.DRAINING and drain:
            return
        replica.state = ReplicaState.DRAINING
        await self.launcher.stop(replica.handle, drain)
        if replica.record is not None:
            await self.probe.forget(replica.record)
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
        switches = CounterMetricFamily(
            "pdcluster_autoscaler_role_switches",
            "Replicas moved to the other pool (drained, then serving its role)",
            labels=["from_role", "to_role"],
        )
        for role in ROLES:
            switches.add_metric([other_role(role), role], c.switch_counts[(other_role(role), role)])
        cost = GaugeMetricFamily(
            "pdcluster_cost_usd_per_million_tokens",
            "A pool's cost (spec cost_per_hour) over the last 5 minutes per million input or output tokens the cluster served",
            labels=["pool", "kind"],
        )
        for (pool, kind), usd in c.cost.cost_per_million_tokens().items():
            cost.add_metric([pool, kind], usd)
        utilization = GaugeMetricFamily(
            "pdcluster_pool_utilization", "Share of the last 5 minutes the pool's engines had requests running", labels=["pool"]
        )
        for pool, share in c.cost.utilization().items():
            utilization.add_metric([pool], share)
        for role in ROLES:
            target.add_metric([role], c.targets[role])
            ready.add_metric([role], c.ready_count(role))
            for direction in ("up", "down"):
                decisions.add_metric([role, direction], c.decision_counts[(role, direction)])
            heals.add_metric([role], c.heal_counts[role])
        yield from (target, ready, decisions, heals, switches, cost, utilization)
