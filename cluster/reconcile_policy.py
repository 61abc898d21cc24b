"""What the controller does in one round, decided from what it sees: pure functions that
return actions, which the controller alone carries out (Dynamo's planner: observe, decide,
then act through one actuator). The same decisions drive the unit tests with no Ray.

- `scale`: the autoscaler's new targets per pool and, with role switching, which replica
  moves to a pool that must grow instead of a new one starting there;
- `converge`: the replicas to start or drain so that each pool meets its target, and, in a
  rolling restart, replaces its outdated replicas one at a time;
- `replacement_reason`: whether a replica that fails its checks is dead, or only cut off.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from pdcluster.cluster.autoscaler import Autoscaler, ScalingDecision
from pdcluster.cluster.cluster_spec import AutoscalingSpec, PoolSpec
from pdcluster.cluster.replica_launcher import Process, ProcessReport
from pdcluster.common.worker_record import ROLES, Role, other_role


class ReplicaState(StrEnum):
    STARTING = "starting"  # launched, not serving yet
    READY = "ready"  # serving its role
    SWITCHING = "switching"  # counted in its new pool; drains, then serves the new role
    DRAINING = "draining"  # leaving: finishes its running requests, then stops


@dataclass(frozen=True)
class ReplicaView:
    """What the policies see of a replica."""

    id: str
    role: Role
    state: ReplicaState
    busy: int = 0  # running + queued requests, at its last check
    outdated: bool = False  # to be replaced (a rolling restart)


@dataclass(frozen=True)
class Start:
    role: Role


@dataclass(frozen=True)
class Drain:
    replica_id: str


@dataclass(frozen=True)
class Switch:
    replica_id: str
    to: Role


Action = Start | Drain | Switch


def scale(
    replicas: list[ReplicaView],
    targets: dict[Role, int],
    loads: dict[Role, float],
    spec: AutoscalingSpec,
    pools: dict[Role, PoolSpec],
    autoscaler: Autoscaler,
) -> tuple[dict[Role, int], list[ScalingDecision], list[Action]]:
    """The pools' new targets, the decisions behind them and the switches they take."""
    targets = dict(targets)
    decisions: list[ScalingDecision] = []
    actions: list[Action] = []
    ready = {role: [r for r in replicas if r.role == role and r.state == ReplicaState.READY] for role in ROLES}
    for role in ROLES:
        decision = autoscaler.decide(role, pools[role], targets[role], len(ready[role]), loads[role])
        if decision is None:
            continue
        donor = None
        if decision.to_replicas > decision.from_replicas:
            donor = _switch_donor(other_role(role), ready, loads, targets, spec, pools)
        if donor is not None:
            # One switch per decision: it takes effect at once, no engine starts.
            decision = replace(
                decision, to_replicas=decision.from_replicas + 1, reason=f"{decision.reason}; {donor.id} switches from {donor.role}"
            )
            old = donor.role
            decisions.append(
                ScalingDecision(decision.at, old, targets[old], targets[old] - 1, loads[old], f"{donor.id} switches to {role}")
            )
            targets[old] -= 1
            actions.append(Switch(donor.id, role))
            ready[old].remove(donor)
        decisions.append(decision)
        targets[role] = decision.to_replicas
    return targets, decisions, actions


def _switch_donor(
    role: Role,
    ready: dict[Role, list[ReplicaView]],
    loads: dict[Role, float],
    targets: dict[Role, int],
    spec: AutoscalingSpec,
    pools: dict[Role, PoolSpec],
) -> ReplicaView | None:
    """With role switching, a ready replica of `role` to move to the other pool: the least
    busy, from a pool under its downscale threshold and above its minimum."""
    if not spec.role_switching or loads[role] >= spec.downscale_ratio:
        return None
    if targets[role] <= pools[role].min_replicas or not ready[role]:
        return None
    return min(ready[role], key=lambda r: r.busy)


def converge(replicas: list[ReplicaView], targets: dict[Role, int], max_replicas: dict[Role, int]) -> list[Action]:
    """Starts for pools under their target; drains for pools over it: outdated replicas first,
    then those still starting, then the least busy ready ones.

    A pool with outdated replicas is replaced one replica at a time: one more than its target
    starts (where its max allows), and once it serves an outdated one drains; at its max, an
    outdated one drains first and its replacement starts at once. Its running requests finish
    on the draining one, so none is lost."""
    actions: list[Action] = []
    for role in ROLES:
        active = [r for r in replicas if r.role == role and r.state != ReplicaState.DRAINING]
        outdated = [r for r in active if r.outdated]
        want = targets[role] + _surge(outdated, targets[role], max_replicas[role])
        starting = any(r.state == ReplicaState.STARTING for r in active)
        if outdated and not starting and len(active) >= want:
            actions.append(Drain(outdated[0].id))
            active.remove(outdated[0])
            want = targets[role] + _surge(outdated[1:], targets[role], max_replicas[role])
        actions += [Start(role)] * (want - len(active))
        surplus = len(active) - want
        if surplus > 0:
            order = sorted(active, key=lambda r: (not r.outdated, r.state == ReplicaState.READY, r.busy))
            actions += [Drain(r.id) for r in order[:surplus]]
    return actions


def _surge(outdated: list[ReplicaView], target: int, max_replicas: int) -> int:
    """One replica over the target while outdated ones remain, where the pool's max allows."""
    return 1 if outdated and target < max_replicas else 0


def replacement_reason(failed_checks: int, unhealthy_after: int, report: ProcessReport) -> tuple[str, str]:
    """(why to replace the replica, or ""; why it is kept though unreachable, or ""). A worker
    that answers on its own node is only cut off from the controller; a node that does not
    answer is cut off or gone, which Ray rules on (it declares the node dead, and the replica
    exits with it). Either way a partition's end finds the worker as it was, not replaced."""
    if report.process == Process.EXITED:
        return f"exited with {report.exit_code}", ""
    if failed_checks < unhealthy_after:
        return "", ""
    if report.process == Process.HUNG:
        return f"{failed_checks} failed health checks, and no answer on its own node either", ""
    return "", f"{failed_checks} failed health checks, but {_KEPT[report.process]}: cut off, kept"


_KEPT = {
    Process.SERVING: "it answers on its own node",
    Process.NODE_UNREACHABLE: "its node does not answer either (Ray rules whether it is gone)",
    Process.RUNNING: "its process runs",
}
