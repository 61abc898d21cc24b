"""The controller's reconcile, heal and scale decisions, driven through a fake launcher and
probe: no Ray, no worker processes. (tests/cluster/ runs it on real Ray.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys

import pytest

from pdcluster.cluster.cluster_spec import ClusterSpec, PoolSpec
from pdcluster.cluster.cluster_status import ClusterStatus
from pdcluster.cluster.controller import ClusterController
from pdcluster.cluster.replica_launcher import LiveReplica, Process, ProcessReport
from pdcluster.common.worker_record import Role, WorkerRecord
from pdcluster.protos import worker_pb2
from pdcluster.worker.config import WorkerConfig

from tests.support.hand_profile import profile
from tests.support.paths import ROOT


class FakeReplica:
    def __init__(self, config: WorkerConfig, pool: PoolSpec, number: int) -> None:
        self.config, self.pool = config, pool
        self.record = WorkerRecord(
            worker_id=config.worker_id,
            role=config.role,
            address=f"10.0.0.{number}:5000",
            kv_endpoint=f"10.0.0.{number}:6000",
            metrics_port=0,
            pid=number,
        )
        self.started = asyncio.Event()
        self.started.set()
        self.exit_code: int | None = None
        self.hung = False
        self.cut_off = ""  # "worker": only the worker is unreachable from the controller; "node": its whole node
        self.stats = worker_pb2.WorkerStats(role=config.role, worker_id=config.worker_id, total_kv_blocks=100, free_kv_blocks=100)
        self.stopped: bool | None = None  # drained (True) or stopped at once (False)


class FakeLauncher:
    def __init__(self) -> None:
        self.replicas: list[FakeReplica] = []
        self._numbers = itertools.count(1)
        self.drains_wait_for: asyncio.Event | None = None
        self.starts_wait = False  # new replicas serve only when the test sets their `started`

    def node_address(self) -> str:
        return "127.0.0.1"

    def launch(self, config: WorkerConfig, pool: PoolSpec) -> FakeReplica:
        replica = FakeReplica(config, pool, next(self._numbers))
        if self.starts_wait:
            replica.started.clear()
        self.replicas.append(replica)
        return replica

    async def wait_ready(self, handle: FakeReplica, timeout_s: float) -> WorkerRecord:
        await handle.started.wait()
        return handle.record

    async def process(self, handle: FakeReplica, ask_worker: bool) -> ProcessReport:
        if handle.exit_code is not None:
            return ProcessReport(Process.EXITED, handle.exit_code)
        if handle.cut_off:  # from the controller: its node says it serves, or does not answer at all
            return ProcessReport(Process.NODE_UNREACHABLE if handle.cut_off == "node" else Process.SERVING)
        return ProcessReport(Process.HUNG if ask_worker and handle.hung else Process.RUNNING)

    async def live_replicas(self) -> list[LiveReplica]:
        return [LiveReplica(r.config.worker_id, r.config.role, r) for r in self.replicas if r.stopped is None]

    async def stop(self, handle: FakeReplica, drain: bool) -> None:
        if drain and self.drains_wait_for is not None:  # a drain takes as long as the test says
            await self.drains_wait_for.wait()
        handle.stopped = drain

    def live(self, role: Role) -> list[FakeReplica]:
        return [r for r in self.replicas if r.config.role == role and r.stopped is None]


class FakeProbe:
    def __init__(self, launcher: FakeLauncher) -> None:
        self._launcher = launcher
        self.forgotten: list[str] = []
        self.refuse_switch = False

    async def stats(self, record: WorkerRecord) -> worker_pb2.WorkerStats:
        replica = next(r for r in self._launcher.replicas if r.record == record)
        if replica.exit_code is not None:
            raise ConnectionRefusedError("no worker there")
        if replica.hung or replica.cut_off:
            raise TimeoutError("no answer")
        return replica.stats

    async def switch_role(self, record: WorkerRecord, role: Role) -> None:
        replica = next(r for r in self._launcher.replicas if r.record == record)
        if self.refuse_switch:
            raise TimeoutError("requests still running")
        replica.stats.role = role

    async def forget(self, record: WorkerRecord) -> None:
        self.forgotten.append(record.worker_id)


def make_controller(spec: dict, launcher: FakeLauncher | None = None) -> tuple[ClusterController, FakeLauncher, FakeProbe]:
    launcher = launcher or FakeLauncher()
    probe = FakeProbe(launcher)
    return ClusterController(ClusterSpec.model_validate(spec).model_dump_json(), launcher, probe), launcher, probe


async def rounds(controller: ClusterController, n: int = 1) -> None:
    for _ in range(n):
        await controller.reconcile()
        await asyncio.sleep(0.01)  # launched replicas report ready, drains run, an autoscale interval passes


@pytest.mark.asyncio
async def test_reconcile_starts_each_pool_at_its_target_with_the_spec_config():
    spec = {"name": "c1", "engine": {"max_model_len": 777}, "prefill": {"replicas": 2, "kv_transport": "grpc"}, "decode": {"replicas": 1}}
    controller, launcher, _ = make_controller(spec)
    await rounds(controller, 2)
    assert len(launcher.live(Role.PREFILL)) == 2 and len(launcher.live(Role.DECODE)) == 1
    assert sorted(await controller.members()) == sorted(r.record.address for r in launcher.replicas)
    config = launcher.live(Role.PREFILL)[0].config
    assert config.engine.max_model_len == 777 and config.kv.transport == "grpc" and config.cluster_name == "c1"
    status = await controller.status()
    assert status.pools[Role.PREFILL].ready == 2 and status.pools[Role.DECODE].target == 1
    assert ClusterStatus.model_validate_json(status.model_dump_json()) == status  # `pdcluster status --json` reads back whole
    await rounds(controller, 3)
    assert len(launcher.replicas) == 3  # nothing more is started once the targets are met


@pytest.mark.asyncio
async def test_a_replica_that_exits_is_replaced_and_the_heal_recorded():
    controller, launcher, probe = make_controller({})
    await rounds(controller, 2)
    dead = launcher.live(Role.DECODE)[0]
    dead.exit_code = 137
    await rounds(controller)
    assert dead.stopped is False  # removed at once, not drained
    assert dead.record.worker_id in probe.forgotten
    await rounds(controller)
    replacement = launcher.live(Role.DECODE)
    assert len(replacement) == 1 and replacement[0] is not dead
    heals = (await controller.status()).heals
    assert [(h.role, h.replaced, h.replacement) for h in heals] == [(Role.DECODE, dead.config.worker_id, replacement[0].config.worker_id)]
    assert heals[0].reason == "exited with 137" and controller.heal_counts[Role.DECODE] == 1


@pytest.mark.asyncio
async def test_a_hung_replica_is_replaced_after_its_failed_checks():
    controller, launcher, _ = make_controller({"unhealthy_after": 3})
    await rounds(controller, 2)
    hung = launcher.live(Role.PREFILL)[0]
    hung.hung = True
    await rounds(controller, 2)
    assert hung.stopped is None  # two missed checks: not yet
    await rounds(controller)
    assert hung.stopped is False
    await rounds(controller)
    assert len(launcher.live(Role.PREFILL)) == 1 and launcher.live(Role.PREFILL)[0] is not hung
    assert "no answer on its own node either" in (await controller.status()).heals[0].reason


@pytest.mark.asyncio
@pytest.mark.parametrize("cut", ["worker", "node"])
async def test_a_replica_cut_off_by_a_partition_is_kept_and_reachable_again_after(cut):
    controller, launcher, _ = make_controller({"unhealthy_after": 3})
    await rounds(controller, 2)
    cut_off = launcher.live(Role.DECODE)[0]
    cut_off.cut_off = cut
    await rounds(controller, 6)
    assert cut_off.stopped is None and launcher.live(Role.DECODE) == [cut_off]  # not replaced, nothing new started
    (status,) = [r for r in (await controller.status()).replicas if r.id == cut_off.config.worker_id]
    assert status.state == "ready" and "cut off, kept" in status.cut_off
    assert ("answers on its own node" if cut == "worker" else "its node does not answer") in status.cut_off
    cut_off.cut_off = ""
    await rounds(controller)
    (status,) = [r for r in (await controller.status()).replicas if r.id == cut_off.config.worker_id]
    assert status.cut_off == "" and not (await controller.status()).heals
    cut_off.exit_code = -1  # Ray ruled its node dead: then it is replaced
    await rounds(controller, 2)
    assert cut_off.stopped is False and len(launcher.live(Role.DECODE)) == 1


@pytest.mark.asyncio
async def test_autoscaler_adds_under_load_and_drains_when_idle():
    autoscaling = {
        "enabled": True,
        "interval_s": 0.001,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "cooldown_s": 0,
        "prefill_target_queued_tokens": 100,
    }
    controller, launcher, _ = make_controller({"prefill": {"max_replicas": 3}, "autoscaling": autoscaling})
    await rounds(controller, 2)
    launcher.live(Role.PREFILL)[0].stats.queued_prefill_tokens = 250  # 2.5 x target
    await rounds(controller, 2)
    assert controller.targets[Role.PREFILL] == 3 and len(launcher.live(Role.PREFILL)) == 3
    assert controller.decision_counts[(Role.PREFILL, "up")] == 1 and controller.targets[Role.DECODE] == 1
    for replica in launcher.live(Role.PREFILL):
        replica.stats.queued_prefill_tokens = 0
    await rounds(controller, 2)
    drained = [r for r in launcher.replicas if r.config.role == Role.PREFILL and r.stopped is not None]
    assert drained and all(r.stopped is True for r in drained)  # scale-down drains
    assert controller.decision_counts[(Role.PREFILL, "down")] >= 1
    assert len(launcher.live(Role.PREFILL)) == controller.targets[Role.PREFILL] >= 1


@pytest.mark.asyncio
async def test_slo_autoscaling_sizes_pools_by_their_latencies_against_the_slos(tmp_path):
    profile_path = tmp_path / "profile.json"
    profile().save(profile_path)  # a step: 10 ms + 1 ms per token
    autoscaling = {"enabled": True, "signal": "slo", "interval_s": 0.001, "upscale_delay_s": 0, "downscale_delay_s": 0, "cooldown_s": 0}
    spec = {
        "prefill": {"max_replicas": 3},
        "decode": {"max_replicas": 2},
        "router": {"profile": str(profile_path), "slo": {"ttft_ms": 1000, "itl_ms": 50}},
        "autoscaling": autoscaling,
    }
    controller, launcher, _ = make_controller(spec)
    await rounds(controller, 2)
    launcher.live(Role.PREFILL)[0].stats.prefill_seconds_p90 = 2.5  # prompts take 2.5 x the TTFT SLO
    launcher.live(Role.DECODE)[0].stats.itl_seconds_p90 = 0.04  # within the ITL SLO (0.8 x)
    await rounds(controller, 2)
    assert controller.targets[Role.PREFILL] == 3 and controller.targets[Role.DECODE] == 1
    assert [d.reason for d in controller.decisions] == ["load 2.50 x target for 0s"]
    for replica in launcher.live(Role.PREFILL):
        replica.stats.prefill_seconds_p90 = 0.1  # well within: one replica goes
    await rounds(controller, 2)
    assert controller.targets[Role.PREFILL] < 3 and controller.decision_counts[(Role.PREFILL, "down")] >= 1


ROLE_SWITCHING = {
    "prefill": {"max_replicas": 2},
    "decode": {"replicas": 2, "max_replicas": 2},
    "autoscaling": {
        "enabled": True,
        "role_switching": True,
        "interval_s": 0.001,
        "upscale_delay_s": 0,
        "downscale_delay_s": 60,  # the idle decode pool would not shrink on its own yet
        "cooldown_s": 0,
        "prefill_target_queued_tokens": 100,
    },
}


@pytest.mark.asyncio
async def test_role_switching_moves_an_idle_decode_replica_to_a_busy_prefill_pool():
    controller, launcher, _ = make_controller(ROLE_SWITCHING)
    await rounds(controller, 2)
    assert all(r.config.role_switching for r in launcher.replicas)  # each can serve either role
    launcher.live(Role.PREFILL)[0].stats.queued_prefill_tokens = 250
    busy = launcher.live(Role.DECODE)[0]
    busy.stats.running = 3  # the other decode replica is the idle one, and it moves
    await rounds(controller, 3)
    assert len(launcher.replicas) == 3  # nothing started, nothing stopped
    assert controller.targets == {Role.PREFILL: 2, Role.DECODE: 1}
    moved = next(r for r in launcher.replicas if r.config.role == Role.DECODE and r is not busy)
    assert moved.stats.role == Role.PREFILL and controller.switch_counts[(Role.DECODE, Role.PREFILL)] == 1
    assert sorted(r.role for r in controller.replicas) == [Role.DECODE, Role.PREFILL, Role.PREFILL]
    assert len(await controller.members()) == 3
    assert [(d.role, d.from_replicas, d.to_replicas) for d in controller.decisions] == [("decode", 2, 1), ("prefill", 1, 2)]


@pytest.mark.asyncio
async def test_a_refused_switch_falls_back_to_starting_and_draining_replicas():
    controller, launcher, probe = make_controller(ROLE_SWITCHING)
    probe.refuse_switch = True
    await rounds(controller, 2)
    launcher.live(Role.PREFILL)[0].stats.queued_prefill_tokens = 250
    await rounds(controller, 3)
    assert controller.switch_counts[(Role.DECODE, Role.PREFILL)] == 0
    assert controller.targets == {Role.PREFILL: 2, Role.DECODE: 1}
    assert len(launcher.live(Role.PREFILL)) == 2 and len(launcher.live(Role.DECODE)) == 1  # one started, one drained


@pytest.mark.asyncio
async def test_a_restarted_controller_adopts_the_running_replicas_and_resumes_healing():
    spec = {"prefill": {"replicas": 2, "max_replicas": 3}, "autoscaling": {"enabled": True, "interval_s": 60}}
    first, launcher, _ = make_controller(spec)
    first.targets[Role.PREFILL] = 3  # as the autoscaler left it
    await rounds(first, 2)
    members = sorted(await first.members())
    assert len(members) == 4
    # The first controller dies without a word; the next life starts from the launcher's live replicas.
    second, _, _ = make_controller(spec, launcher)
    await second.start(serve_metrics=False)
    assert sorted(await second.members()) == members  # known before its first round: routers never see an empty cluster
    assert second.targets[Role.PREFILL] == 3
    await rounds(second, 2)
    assert len(launcher.replicas) == 4  # nothing restarted, nothing added
    dead = launcher.live(Role.DECODE)[0]
    dead.exit_code = 137
    await rounds(second, 2)
    assert dead.stopped is False and len(launcher.live(Role.DECODE)) == 1 and launcher.live(Role.DECODE)[0] is not dead
    await second.shutdown()


@pytest.mark.asyncio
async def test_a_switch_outlives_the_controller_that_made_it():
    """A restarted controller counts a switched replica in the pool it serves now (its worker
    says so), not the one it was started in: the pools keep their sizes and nothing restarts."""
    first, launcher, _ = make_controller(ROLE_SWITCHING)
    await rounds(first, 2)
    launcher.live(Role.PREFILL)[0].stats.queued_prefill_tokens = 250
    launcher.live(Role.DECODE)[0].stats.running = 3
    await rounds(first, 3)
    assert first.targets == {Role.PREFILL: 2, Role.DECODE: 1} and first.switch_counts[(Role.DECODE, Role.PREFILL)] == 1
    for r in launcher.replicas:
        r.stats.queued_prefill_tokens = r.stats.running = 0  # the burst is over; the next life sees a quiet cluster
    second, _, _ = make_controller(ROLE_SWITCHING, launcher)
    await second.start(serve_metrics=False)
    assert second.targets == {Role.PREFILL: 2, Role.DECODE: 1}
    assert sorted(r.role for r in second.replicas) == [Role.DECODE, Role.PREFILL, Role.PREFILL]
    await rounds(second, 2)
    assert len(launcher.replicas) == 3 and all(r.stopped is None for r in launcher.replicas)  # nothing started or stopped
    await second.shutdown()


def test_replica_ids_name_no_role():
    controller, launcher, _ = make_controller({"prefill": {"replicas": 1}, "decode": {"replicas": 1}})
    asyncio.run(rounds(controller))
    assert all(r.id.startswith("replica-") for r in controller.replicas)
    assert {r.config.worker_id for r in launcher.replicas} == {r.id for r in controller.replicas}


@pytest.mark.asyncio
async def test_shutdown_during_a_drain_still_stops_every_replica():
    controller, launcher, _ = make_controller({"prefill": {"replicas": 2}, "decode": {"replicas": 1}})
    await rounds(controller)
    launcher.drains_wait_for = asyncio.Event()
    controller.targets[Role.PREFILL] = 1
    await rounds(controller)  # one prefill replica starts draining, and is still draining...
    shutdown = asyncio.create_task(controller.shutdown())  # ...when the controller is told to stop
    await asyncio.sleep(0.05)
    launcher.drains_wait_for.set()
    await shutdown
    assert [r.stopped for r in launcher.replicas] == [True, True, True]  # each drained, none left running


@pytest.mark.asyncio
async def test_an_operator_scales_a_pool_within_its_bounds_and_the_decision_is_recorded():
    spec = {"name": "c9", "prefill": {"replicas": 1}, "decode": {"replicas": 1, "max_replicas": 3}}
    controller, launcher, _ = make_controller(spec)
    await rounds(controller, 2)
    decision = await controller.scale_pool("decode", 3)
    assert (decision.from_replicas, decision.to_replicas) == (1, 3) and "operator" in decision.reason
    assert len(launcher.live(Role.DECODE)) == 3  # started at once, not at the next round
    await rounds(controller, 2)
    status = await controller.status()
    assert status.pools[Role.DECODE].ready == 3 and status.decisions[-1] == decision
    started = [r for r in status.replicas if r.role == Role.DECODE]
    assert sum(r.decided_at >= decision.at for r in started) == 2  # the replicas it added were decided then
    for wrong in (("decode", 4), ("prefill", 2), ("prefill", 0), ("both", 1)):
        with pytest.raises(ValueError):
            await controller.scale_pool(*wrong)
    await controller.scale_pool("decode", 1)
    await rounds(controller, 2)
    assert len(launcher.live(Role.DECODE)) == 1 and (await controller.status()).pools[Role.DECODE].target == 1


@pytest.mark.asyncio
async def test_a_rolling_restart_replaces_one_replica_at_a_time_each_after_its_replacement_serves():
    controller, launcher, _ = make_controller({"decode": {"replicas": 2, "max_replicas": 3}})
    await rounds(controller, 2)
    old = launcher.live(Role.DECODE)
    launcher.starts_wait = True
    assert await controller.restart_pool("decode") == 2
    await rounds(controller, 3)
    new = [r for r in launcher.live(Role.DECODE) if r not in old]
    assert len(new) == 1 and all(r.stopped is None for r in old)  # one over the target; nothing drained before it serves
    assert (await controller.status()).pools[Role.DECODE].outdated == 2
    new[0].started.set()
    await rounds(controller, 2)
    assert [r.stopped for r in old] == [True, None]  # drained, so its running requests finish
    second = [r for r in launcher.live(Role.DECODE) if r not in old and r is not new[0]]
    assert len(second) == 1  # the next replacement, at once
    second[0].started.set()
    await rounds(controller, 3)
    assert [r.stopped for r in old] == [True, True] and launcher.live(Role.DECODE) == [new[0], second[0]]
    status = await controller.status()
    assert status.pools[Role.DECODE].outdated == 0 and status.pools[Role.DECODE].ready == 2
    assert len(launcher.live(Role.PREFILL)) == 1 and len(launcher.replicas) == 5  # the other pool untouched
    with pytest.raises(ValueError, match="role must be one of"):
        await controller.restart_pool("router")


@pytest.mark.asyncio
async def test_a_pool_at_its_max_drains_an_old_replica_first_and_starts_its_replacement_at_once():
    controller, launcher, _ = make_controller({})  # one decode replica, max 1
    await rounds(controller, 2)
    (old,) = launcher.live(Role.DECODE)
    assert await controller.restart_pool("decode") == 1
    await rounds(controller)
    (new,) = launcher.live(Role.DECODE)
    assert old.stopped is True and new is not old


@pytest.mark.asyncio
async def test_a_rolling_upgrade_starts_the_replacements_on_the_new_spec_and_leaves_the_other_pool_as_it_was():
    controller, launcher, _ = make_controller({"engine": {"max_num_seqs": 8}})
    await rounds(controller, 2)
    (old,) = launcher.live(Role.DECODE)
    new_spec = ClusterSpec.model_validate(
        {"engine": {"max_num_seqs": 16}, "decode": {"engine": {"num_gpu_blocks_override": 120}, "cost_per_hour": 3.0}}
    )
    assert await controller.restart_pool("decode", new_spec.model_dump_json()) == 1
    await rounds(controller)
    (new,) = launcher.live(Role.DECODE)
    assert old.stopped is True and new is not old
    assert new.config.engine.vllm_args["max_num_seqs"] == 16 and new.config.engine.vllm_args["num_gpu_blocks_override"] == 120
    assert new.pool.cost_per_hour == 3.0
    assert launcher.live(Role.PREFILL)[0].config.engine.vllm_args["max_num_seqs"] == 8  # not restarted: as it started


CONTROLLER_STARTS = """
import json, sys
from pdcluster.cluster.controller import ClusterController
from pdcluster.common.worker_record import Role
controller = ClusterController(sys.argv[1], launcher=object(), probe=object())
engine = controller.spec.worker_config(Role.PREFILL, "replica-1").engine
print(json.dumps({"vllm imported": "vllm" in sys.modules, "engine": engine.vllm_args}))
"""


def test_the_controller_takes_its_spec_and_makes_worker_configs_without_importing_vllm():
    """vLLM checked the spec's engine arguments where the spec was made. The controller (a Ray
    actor, started again after a crash) does not import vLLM to check them again: that was
    seconds of every `pdcluster serve` start and every controller restart."""
    spec = ClusterSpec.model_validate({"engine": {"dtype": "float32"}, "prefill": {"engine": {"max_num_seqs": 4}}})
    done = subprocess.run(
        [sys.executable, "-c", CONTROLLER_STARTS, spec.model_dump_json()], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen == {"vllm imported": False, "engine": {"dtype": "float32", "max_num_seqs": 4, "tensor_parallel_size": 1}}
