"""Real worker and router processes for tests."""

from __future__ import annotations

import contextlib

from pdcluster.common.processes import ROLE_SWITCHING, start_process, stop_all, wait_ready
from pdcluster.common.worker_record import Role

# Compiling the model (torch.compile: ~30 s more per engine start here, more on CI) is not
# what most tests are about. test_core_path keeps vLLM's compiled default.
EAGER = ["--enforce-eager"]
# Test engines hold 256 MiB of KV (131,072 tokens of the tiny model), not pdcluster's 1 GiB:
# the suite keeps several engines up at once (the shared vLLM reference and pair, a module's
# own), and each one's cache is memory written at its start and held to its end.
SMALL_KV_BYTES = 256 << 20
SMALL_KV = ["--kv-cache-memory-bytes", str(SMALL_KV_BYTES)]


@contextlib.contextmanager
def running_cluster(
    prefill: int = 1,
    decode: int = 1,
    worker_args: list[str] = (),
    router_args: list[str] = (),
    role_switching: bool = False,
    router_env: dict | None = None,
):
    """Workers (eager; able to switch roles if asked) and a router in front of them, each its
    own process; yields (router, workers)."""
    worker_args = [*worker_args, *EAGER, *SMALL_KV]

    def worker(role: Role):
        return start_process(ROLE_SWITCHING, ["--role", role, *worker_args]) if role_switching else start_process(role, worker_args)

    workers = [worker(Role.PREFILL) for _ in range(prefill)] + [worker(Role.DECODE) for _ in range(decode)]
    started = list(workers)
    try:
        for w in workers:
            wait_ready(w)
        router = start_router([w.address for w in workers], router_args, router_env)
        started.append(router)
        yield router, workers
    finally:
        stop_all(started)


def start_router(worker_addresses: list[str], router_args: list[str] = (), env: dict | None = None):
    """A router process on free ports in front of the given workers, ready."""
    (router,) = start_routers(worker_addresses, [router_args], env)
    return router


def start_routers(worker_addresses: list[str], each_args: list[list[str]], env: dict | None = None):
    """One router per argument list, in front of the same workers, started together (a router
    start is seconds of imports on one core) and all ready."""
    addresses = [arg for address in worker_addresses for arg in ("--worker", address)]
    routers = [start_process("router", ["--port", "0", "--grpc-port", "0", *args, *addresses], env) for args in each_args]
    try:
        return [wait_ready(router) for router in routers]
    except BaseException:
        stop_all(routers)
        raise


@contextlib.contextmanager
def running_pair(prefill_args: list[str] = (), decode_args: list[str] = (), env: dict | None = None, compiled: bool = False):
    """A prefill and a decode worker process, ready, stopped on exit."""
    engine = [*([] if compiled else EAGER), *SMALL_KV]
    workers = [start_process(Role.PREFILL, [*prefill_args, *engine], env=env), start_process(Role.DECODE, [*decode_args, *engine], env=env)]
    try:
        for w in workers:
            wait_ready(w)
        yield tuple(workers)
    finally:
        stop_all(workers)
