"""`pdcluster bench chaos`: one fault at a time under a steady open-loop load.

The cluster is `pdcluster serve --prefill 2 --decode 2` on a private Redis registry. First a
fault-free run records every prompt's greedy answer and the slowest request (the ceiling);
then each fault is injected a few seconds into its own load window. After each one the
battery waits for the cluster to be whole again and reports: requests, lost (an error or no
answer), wrong (an answer unlike the fault-free one), the slowest request and how much longer
it took than the fault-free slowest, the heal time, whether every worker's KV blocks are
back at rest, and stray processes (anything of ours outside the live cluster).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import grpc
import httpx
import psutil

from pdcluster.cluster.cluster_status import ClusterStatus
from pdcluster.cluster.ray_cluster import find_controller
from pdcluster.common.redis_server import start_redis
from pdcluster.common.serve_process import launch_serve, stop_serve
from pdcluster.common.tiny_model.generate import CORPUS, ensure_tiny_model
from pdcluster.common.worker_auth import token_metadata
from pdcluster.common.worker_record import Role
from pdcluster.kv_transfer.chunk_header import KVChunkHeader
from pdcluster.protos import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from pdcluster.router.cluster_view import ClusterView, WorkerSummary

FAULTS = (
    "client-hangup",
    "garbage",
    "kv-cut",
    "controller-kill",
    "sigkill-prefill",
    "sigstop-prefill",
    "sigkill-decode",
    "sigstop-decode",
    "redis-down",
)
RATE = 2.0  # requests/s, open loop
LOAD_S = 12.0  # arrivals per fault window (default)
FAULT_AT_S = 4.0  # into the window
MAX_TOKENS = 24
REQUEST_TIMEOUT_S = 300.0
HEAL_TIMEOUT_S = 300.0
STATUS_TIMEOUT_S = 60.0  # one status call of the controller (longer while Ray restarts it)
REST_TIMEOUT_S = 60.0


@dataclass
class FaultResult:
    fault: str
    requests: int
    lost: int
    wrong: int
    slowest_s: float
    extra_s: float  # slowest minus the fault-free slowest
    heal_s: float  # from the fault until the cluster is whole again
    kv_at_rest: bool
    strays: int
    note: str = ""


class ChaosCluster:
    def __init__(self, prefill: int, decode: int, serve_flags: Sequence[str] = ()) -> None:
        self.roles = {"prefill": prefill, "decode": decode}
        self.started = time.time()
        self.redis, self.redis_url = start_redis()
        self.redis_port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        args = [
            "--prefill",
            str(prefill),
            "--decode",
            str(decode),
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--registry",
            self.redis_url,
            *serve_flags,
        ]
        try:
            self.proc, self.lines, served = launch_serve(args)
        except Exception:
            self.redis.kill()
            raise
        self.http, self.grpc = served.router.http, served.router.grpc
        try:
            # One Ray connection for the whole run. The handle outlives the controller's restarts:
            # Ray sends calls to its next life.
            self.controller = find_controller("pdcluster", served.ray_address)
        except Exception:  # nothing it started outlives it
            self.close()
            raise

    def workers(self) -> list[WorkerSummary]:
        return ClusterView.model_validate(httpx.get(self.http + "/cluster", timeout=30).json()).workers

    def status(self) -> ClusterStatus:
        import ray

        return ray.get(self.controller.status.remote(), timeout=STATUS_TIMEOUT_S)

    def kill_redis(self) -> None:
        self.redis.kill()
        self.redis.wait()

    def start_redis(self) -> None:
        self.redis, _ = start_redis(self.redis_port)

    def whole(self) -> bool:
        """Every pool at its size with healthy workers, seen by the router and the controller."""
        try:
            healthy = [w for w in self.workers() if w.healthy]
            pools = self.status().pools
        except Exception:
            return False
        return all(
            sum(w.role == role for w in healthy) == n and pools[Role(role)].ready == n == pools[Role(role)].target
            for role, n in self.roles.items()
        )

    def wait_whole(self) -> bool:
        deadline = time.monotonic() + HEAL_TIMEOUT_S
        while not self.whole():
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
        return True

    def kv_at_rest(self) -> bool:
        """No request running or queued anywhere and every KV block free again."""
        deadline = time.monotonic() + REST_TIMEOUT_S
        while time.monotonic() < deadline:
            workers = self.workers()
            every = len(workers) == sum(self.roles.values())  # an empty view is not "at rest"
            if every and all(w.running == 0 and w.queued == 0 and w.free_kv_blocks == w.total_kv_blocks > 0 for w in workers):
                return True
            time.sleep(1.0)
        return False

    def strays(self) -> list[str]:
        """Processes of ours outside the live cluster: worker or engine processes no live worker
        owns (a killed or replaced worker's leftovers), wherever they now hang."""
        live = {w.pid for w in self.workers()}
        live |= {c.pid for pid in live if psutil.pid_exists(pid) for c in psutil.Process(pid).children(recursive=True)}
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
            cmd = " ".join(p.info["cmdline"] or ())
            if (
                worker_or_engine(cmd)
                and p.info["create_time"] >= self.started - 1
                and p.pid not in live
                and p.info["status"] != psutil.STATUS_ZOMBIE
            ):
                found.append(f"{p.pid} {cmd[:80]}")
        return found

    def close(self) -> None:
        import ray

        ray.shutdown()
        stop_serve(self.proc)
        self.redis.kill()
        self.redis.wait()


class Load:
    """Open-loop requests over gRPC Inference.Complete: each answer checked against `expected`."""

    def __init__(self, grpc_address: str, prompts: list[list[int]]) -> None:
        self._address = grpc_address
        self.prompts = prompts
        self.errors: list[str] = []  # of the last run
        self.wrong: list[str] = []  # of the last run: which prompt, and where it diverged

    async def run(self, duration_s: float, rate: float, expected: list[list[int]] | None, fault: Callable[[], None] | None):
        """Arrivals for `duration_s` (0: each prompt once), the fault fired FAULT_AT_S in."""
        channel = grpc.aio.insecure_channel(self._address)
        stub = inference_pb2_grpc.InferenceStub(channel)
        rng = random.Random(7)
        results: list[tuple[int, list[int] | None, float]] = []
        self.errors, self.wrong = [], []

        async def one(i: int) -> None:
            started = time.monotonic()
            request = inference_pb2.GenerateRequest(
                prompt_token_ids=self.prompts[i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
            )
            try:
                reply = await stub.Complete(request, timeout=REQUEST_TIMEOUT_S)
                results.append((i, list(reply.token_ids), time.monotonic() - started))
            except grpc.aio.AioRpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")
                results.append((i, None, time.monotonic() - started))

        tasks, start, n = [], time.monotonic(), 0
        fired = fault is None
        while (time.monotonic() - start < duration_s) if duration_s else n < len(self.prompts):
            if not fired and time.monotonic() - start >= FAULT_AT_S:
                fired = True
                tasks.append(asyncio.create_task(asyncio.to_thread(fault)))  # arrivals go on meanwhile
            tasks.append(asyncio.create_task(one(n % len(self.prompts))))
            n += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        await channel.close()
        answers = {i: tokens for i, tokens, _ in results}
        lost = sum(tokens is None for _, tokens, _ in results)
        for i, tokens, _ in results:
            if expected is not None and tokens is not None and tokens != expected[i]:
                at = next((k for k, (a, b) in enumerate(zip(tokens, expected[i])) if a != b), min(len(tokens), len(expected[i])))
                self.wrong.append(f"prompt {i} ({len(self.prompts[i])} tokens) diverged at output token {at}")
        return len(results), lost, len(self.wrong), max(s for _, _, s in results), answers


class Battery:
    def __init__(self, cluster: ChaosCluster, load: Load, load_s: float = LOAD_S) -> None:
        self.cluster, self.load, self.load_s = cluster, load, load_s
        self.expected: list[list[int]] = []
        self.baseline_slowest = 0.0
        self.notes: list[str] = []

    def baseline(self) -> FaultResult:
        n = len(self.load.prompts)
        requests, lost, wrong, slowest, answers = asyncio.run(self.load.run(0, RATE, None, None))
        missing = [i for i in range(n) if answers.get(i) is None]
        if missing:
            raise RuntimeError(f"the fault-free run lost requests {missing} ({self.load.errors[:3]}): no baseline")
        self.expected = [answers[i] for i in range(n)]
        self.baseline_slowest = slowest
        return FaultResult("none (baseline)", requests, lost, 0, round(slowest, 2), 0.0, 0.0, self.cluster.kv_at_rest(), 0)

    def run(self, fault: str) -> FaultResult:
        inject, undo = getattr(self, "_" + fault.replace("-", "_"))()
        self.notes = []
        injected_at = [0.0]

        def fire() -> None:
            injected_at[0] = time.monotonic()
            inject()

        requests, lost, wrong, slowest, _ = asyncio.run(self.load.run(self.load_s, RATE, self.expected, fire))
        self.notes += [f"lost: {e}" for e in sorted(set(self.load.errors))[:3]]
        self.notes += [f"wrong: {w}" for w in self.load.wrong[:3]]
        if undo is not None:
            undo()
        whole = self.cluster.wait_whole()
        heal_s = time.monotonic() - injected_at[0] if whole else float("inf")
        return FaultResult(
            fault,
            requests,
            lost,
            wrong,
            round(slowest, 2),
            round(slowest - self.baseline_slowest, 2),
            round(heal_s, 1),
            self.cluster.kv_at_rest(),
            len(self.cluster.strays()),
            "; ".join(self.notes),
        )

    # -- faults: each returns (inject, undo) ----------------------------------------

    def _worker(self, role: str) -> WorkerSummary:
        return next(w for w in self.cluster.workers() if w.role == role and w.healthy)

    def _signal(self, role: str, sig: int):
        """A frozen (SIGSTOP) worker stays frozen: the controller must find and replace it."""

        def inject() -> None:
            worker = self._worker(role)
            self.notes.append(f"{signal.Signals(sig).name} {worker.id} pid {worker.pid}")
            os.kill(worker.pid, sig)

        return inject, None

    def _sigkill_prefill(self):
        return self._signal("prefill", signal.SIGKILL)

    def _sigkill_decode(self):
        return self._signal("decode", signal.SIGKILL)

    def _sigstop_prefill(self):
        return self._signal("prefill", signal.SIGSTOP)

    def _sigstop_decode(self):
        return self._signal("decode", signal.SIGSTOP)

    def _controller_kill(self):
        before = {w.pid for w in self.cluster.workers()}

        def inject() -> None:
            pid = self.cluster.status().controller_pid
            os.kill(pid, signal.SIGKILL)
            self.notes.append(f"SIGKILL controller pid {pid}")

        def check() -> None:
            self.cluster.wait_whole()
            status = self.cluster.status()
            kept = before == {r.pid for r in status.replicas}
            self.notes.append(f"back as pid {status.controller_pid}, {'no worker restarted' if kept else 'WORKERS RESTARTED'}")

        return inject, check

    def _redis_down(self):
        def inject() -> None:
            self.cluster.kill_redis()
            self.notes.append("redis-server SIGKILLed; back empty after 5 s")
            time.sleep(5.0)
            self.cluster.start_redis()

        return inject, None

    def _kv_cut(self):
        """Cut every established TCP connection into the KV endpoints and data channels,
        every 50 ms for 3 s, so transfers in flight lose their connections."""

        def inject() -> None:
            ports = set()
            for w in self.cluster.workers():
                for p in [psutil.Process(w.pid), *psutil.Process(w.pid).children(recursive=True)]:
                    ports |= {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
                ports.discard(int(w.address.rsplit(":", 1)[1]))  # not the Worker service: only KV
            cut, end = 0, time.monotonic() + 3.0
            while time.monotonic() < end:
                for port in ports:
                    out = subprocess.run(
                        ["ss", "-K", "-tn", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
                    )
                    cut += max(0, len(out.stdout.splitlines()) - 1)
                time.sleep(0.05)
            self.notes.append(f"{cut} KV connections cut on {len(ports)} ports")

        return inject, None

    def _garbage(self):
        def inject() -> None:
            targets = self._listening_ports()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda target: _send_garbage(*target), targets))
            refused = self._wrong_token_calls()
            self.notes.append(f"garbage on {len(targets)} ports; wrong token refused on {refused}")

        return inject, None

    def _client_hangup(self):
        def inject() -> None:
            hung_up = asyncio.run(_hang_up_streams(self.cluster.http, self.cluster.grpc, self.load.prompts[:8]))
            self.notes.append(f"{hung_up} streams closed after their first token")

        return inject, None

    def _listening_ports(self) -> list[tuple[str, int]]:
        pids = {self.cluster.proc.pid} | {w.pid for w in self.cluster.workers()}
        pids |= {c.pid for pid in set(pids) for c in psutil.Process(pid).children() if "EngineCore" in " ".join(c.cmdline())}
        return sorted(
            {
                (c.laddr.ip, c.laddr.port)
                for pid in pids
                for c in psutil.Process(pid).net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            }
        )

    def _wrong_token_calls(self) -> int:
        refused = 0
        for w in self.cluster.workers():
            with grpc.insecure_channel(w.address) as channel:
                try:
                    worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=10, metadata=token_metadata("wrong"))
                except grpc.RpcError as e:
                    refused += e.code() == grpc.StatusCode.UNAUTHENTICATED
        return refused


def worker_or_engine(command_line: str) -> bool:
    """A worker process of either role, or the engine process vLLM spawns for it."""
    return any(mark in command_line for mark in ("pdcluster.prefill_worker", "pdcluster.decode_worker", "EngineCore"))


def _send_garbage(host: str, port: int) -> None:
    """Random bytes; an HTTP/2 preface then garbage; a KV chunk header declaring a huge payload
    with a wrong token. Each on its own connection; what comes back does not matter."""
    huge = KVChunkHeader("chaos", 0, 0, 1, "float32", 1 << 30, "x", 1 << 30, 0, auth_token="wrong").encode()
    for payload in (
        os.urandom(4096),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(1024),
        len(huge).to_bytes(4, "little") + huge + os.urandom(4096),
    ):
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(payload)
                s.settimeout(0.5)
                s.recv(1024)
        except OSError:
            pass


async def _hang_up_streams(http: str, grpc_address: str, prompts: list[list[int]]) -> int:
    """Streams that the client closes after the first token: half over HTTP, half over gRPC."""
    hung = 0
    async with httpx.AsyncClient(timeout=60) as client:
        model = (await client.get(http + "/v1/models")).json()["data"][0]["id"]
        for prompt in prompts[: len(prompts) // 2]:
            body = {"model": model, "prompt": prompt, "max_tokens": 200, "stream": True, "ignore_eos": True}
            async with client.stream("POST", http + "/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    hung += 1
                    break
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for prompt in prompts[len(prompts) // 2 :]:
            call = stub.Generate(inference_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=200, ignore_eos=True))
            await call.read()
            call.cancel()
            hung += 1
    return hung


def chaos_prompts(count: int) -> list[list[int]]:
    """Long prompts (past the bypass, so prefilled remotely and their KV sent) and short ones."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ensure_tiny_model()).encode(CORPUS.read_text())
    starts = [i * 37 % (len(ids) - 160) for i in range(count)]
    return [ids[start : start + (160 if i % 3 else 24)] for i, start in enumerate(starts)]


def main(
    json_output: bool = False,
    faults: Sequence[str] | None = None,
    prefill: int = 2,
    decode: int = 2,
    serve_flags: Sequence[str] = (),
    load_s: float = LOAD_S,
    lab: bool = False,
) -> int:
    """`lab`: on a lab of emulated hosts, with the network's faults (`chaos_lab`)."""
    if lab:
        from pdcluster.bench import chaos_lab

        cluster: ChaosCluster = chaos_lab.LabChaosCluster(serve_flags)
        battery_type: type[Battery] = chaos_lab.LabBattery
        faults = faults or chaos_lab.LAB_FAULTS
    else:
        cluster, battery_type, faults = ChaosCluster(prefill, decode, serve_flags), Battery, faults or FAULTS
    try:
        battery = battery_type(cluster, Load(cluster.grpc, chaos_prompts(24)), load_s)
        rows = [battery.baseline()]
        print(
            f"{'fault':<16} {'requests':>8} {'lost':>5} {'wrong':>6} {'slowest s':>10} {'extra s':>8} {'heal s':>7} {'KV rest':>8} {'strays':>7}  note"
        )
        _print_row(rows[0])
        for fault in faults:
            rows.append(battery.run(fault))
            _print_row(rows[-1])
    finally:
        cluster.close()
    if json_output:
        print(json.dumps({"baseline_slowest_s": rows[0].slowest_s, "faults": [asdict(r) for r in rows[1:]]}))
    return 0 if all(r.lost == r.wrong == r.strays == 0 and r.kv_at_rest for r in rows) else 1


def _print_row(r: FaultResult) -> None:
    print(
        f"{r.fault:<16} {r.requests:>8} {r.lost:>5} {r.wrong:>6} {r.slowest_s:>10.2f} {r.extra_s:>8.2f} {r.heal_s:>7.1f} "
        f"{'yes' if r.kv_at_rest else 'NO':>8} {r.strays:>7}  {r.note}",
        flush=True,
    )
