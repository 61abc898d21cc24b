"""A 1P+1D pdcluster on this machine, each process its own, for measurements: the benchmarks
and `pdcluster profile`'s serving-path costs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pdcluster.common.processes import LocalProcess, start_process, stop_all, wait_ready
from pdcluster.common.worker_record import Role
from pdcluster.worker.config import EngineConfig, WorkerConfig, worker_args
from pdcluster.worker.engine_args import engine_environment


def engine_env(cpus: set[int], engine: EngineConfig) -> dict:
    """An engine's environment as pdcluster's workers set it, one model thread per core it owns."""
    return {**engine_environment(engine), "OMP_NUM_THREADS": str(len(cpus))}


def start_pdcluster(
    engine: EngineConfig,
    workers_on: list[tuple[Role, set[int]]],
    log_dir: str,
    router_flags: Sequence[str] = (),
    kv_transport: str = "auto",
    hosts: Mapping[Role, tuple[str, Sequence[str]]] = {},
) -> tuple[list[LocalProcess], str]:
    """A worker of each role on its cores, and the router; returns them and its URL. `hosts`
    runs a role's worker elsewhere: its address there, and the command prefix that runs it
    there (a lab host's)."""
    placed = {role: {"host": address} for role, (address, _) in hosts.items()}
    configs = [
        (WorkerConfig(role=role, engine=engine, kv={"transport": kv_transport}, **placed.get(role, {})), cpus) for role, cpus in workers_on
    ]
    workers = [
        start_process(c.role, worker_args(c), engine_env(cpus, engine), log_dir, cpus, prefix=hosts[c.role][1] if c.role in hosts else ())
        for c, cpus in configs
    ]
    started = list(workers)
    try:
        for w in workers:
            wait_ready(w, timeout=600)
        router = start_router(engine.model, workers, router_flags, log_dir)
        started.append(router)
        wait_ready(router)
    except BaseException:
        stop_all(started)
        raise
    return started, router.router.http


def start_router(model: str, workers: Sequence[LocalProcess], flags: Sequence[str], log_dir: str) -> LocalProcess:
    """A router on free ports in front of `workers` (not yet ready: `wait_ready` it)."""
    args = ["--port", "0", "--grpc-port", "0", "--model", model, *flags, *(a for w in workers for a in ("--worker", w.address))]
    return start_process("router", args, log_dir=log_dir)
