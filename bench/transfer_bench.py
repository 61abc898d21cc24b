"""`pdcluster bench transfer`: KV transfer throughput beside its ceilings, in one run.

Moves Llama-3-8B-shaped KV (32 layers x 8 KV heads x 128 dims x bf16 = 128 KiB per token)
for 1K/4K/16K-token prompts from paged blocks in this process into paged blocks in a
consumer process on loopback, over every KV data path: the default (`auto`: NIXL where both
ends have it, else TCP), NIXL one-sided writes, the raw-TCP data channel negotiated over
the KVTransfer gRPC service, and plain gRPC streams. Each is timed end to end: until the
producer hears the consumer holds every block (checksums checked). The ceilings, measured
in the same run between the same two processes: a raw TCP socket (4 MiB sendall /
recv_into a preallocated buffer), an in-memory copy, and NIXL's own WRITE of the same
blocks (where `nixl-cu12` is installed) timed until the consumer holds its notification.
No NIXL agent runs a progress thread (NIXL's spins a core); the callers poll instead.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import statistics
import time
import uuid
from dataclasses import dataclass

import torch

from pdcluster.kv_transfer.connector_metadata import SaveSpec
from pdcluster.kv_transfer.kv_endpoint import KVEndpoint
from pdcluster.kv_transfer.nixl_agent import nixl_api
from pdcluster.kv_transfer.settings import TRANSPORTS, KVEndpointSettings
from pdcluster.lab.lab_hosts import enter_network

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 128
DTYPE = torch.bfloat16
TOKEN_BYTES = LAYERS * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, 2 bytes each: 128 KiB
SIZES = (1024, 4096, 16384)
TCP_CHUNK = 4 << 20


@dataclass
class Row:
    tokens: int
    nbytes: int
    kv_gbps: float  # our transfer on the default data path (auto)
    kv_tcp_gbps: float  # ... over the raw-TCP data channel
    kv_grpc_stream_gbps: float  # ... over gRPC streams only
    kv_nixl_gbps: float | None  # ... over NIXL writes; None: NIXL is not installed here
    default_transport: str  # what auto chose
    tcp_gbps: float
    memcpy_gbps: float
    nixl_write_gbps: float | None  # NIXL's own WRITE, the ceiling of the NIXL path
    idle_cpu_pct: tuple[float, float]  # consumer process, producer process, once transfers stop


def _paged_layers(tokens: int, fill: bool) -> list[torch.Tensor]:
    blocks = tokens // BLOCK + 1
    shape = (blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM)  # vLLM's CPU layout
    make = (lambda: torch.randn(shape).to(DTYPE)) if fill else (lambda: torch.zeros(shape, dtype=DTYPE))
    return [make() for _ in range(LAYERS)]


def _nixl_agent(name: str, layers: list[torch.Tensor]):
    """A NIXL agent (no progress thread) with `layers` registered, or None without NIXL."""
    api = nixl_api()
    if api is None:
        return None
    agent = api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False))
    agent.register_memory(layers)
    return agent


def _consumer(conn, tokens: int, settings: KVEndpointSettings, lab_host: tuple[str, str] | None) -> None:
    """Child process: a KV consumer endpoint, a raw TCP sink and a NIXL agent; on a lab's host
    (lab, host) where given."""
    if lab_host:
        settings = settings.model_copy(update={"host": enter_network(*lab_host)})
    layers = _paged_layers(tokens, fill=False)
    nixl = _nixl_agent(f"consumer-{uuid.uuid4().hex}", layers)
    endpoint = KVEndpoint(layers, layers[0].shape[0], BLOCK, settings, produce=False, consume=True)
    sink = socket.create_server((settings.host, 0))
    conn.send((endpoint.address, sink.getsockname()[:2]))
    buf = bytearray(TCP_CHUNK)
    view = memoryview(buf)
    while True:
        msg = conn.recv()
        if msg[0] == "expect":
            endpoint.receiver.expect(msg[1], msg[1], list(range(tokens // BLOCK)), 0)
            conn.send("ok")
        elif msg[0] == "poll":
            endpoint.receiver.poll()
            conn.send("ok")
        elif msg[0] == "nixl":
            conn.send(None if nixl is None else (nixl.get_agent_metadata(), nixl.get_serialized_descs(_block_descs(nixl, layers, tokens))))
        elif msg[0] == "nixl_wait":
            notified = 0
            while not notified:
                notified = sum(len(v) for v in nixl.get_new_notifs().values())
                time.sleep(0.0005)
            conn.send("ok")
        elif msg[0] == "tcp":
            sock, _ = sink.accept()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            remaining = msg[1]
            while remaining:
                n = sock.recv_into(view[: min(len(buf), remaining)])
                if not n:
                    break
                remaining -= n
            sock.sendall(b"k")
            sock.close()
            conn.send("ok")
        else:
            endpoint.close()
            conn.send("bye")
            return


def _kv_once(producer: KVEndpoint, consumer: str, conn, tokens: int) -> float:
    """One transfer's GB/s, end to end."""
    transfer_id = uuid.uuid4().hex
    conn.send(("expect", transfer_id))
    conn.recv()
    blocks = list(range(tokens // BLOCK))
    spec = SaveSpec(transfer_id, transfer_id, consumer, blocks, 0, len(blocks), True, True, len(blocks))
    started = time.perf_counter()
    for layer in range(LAYERS):
        producer.sender.add_layer(spec, layer)
    producer.sender.finalize(transfer_id)
    while not producer.sender.poll({transfer_id}):
        producer.progress.wait(0.001)
        producer.progress.clear()
    elapsed = time.perf_counter() - started
    conn.send(("poll",))
    conn.recv()
    if producer.stats.snapshot()["transfers_failed"]:
        raise RuntimeError("a benchmark transfer failed")
    return tokens * TOKEN_BYTES / elapsed / 1e9


def _tcp_once(sink: tuple[str, int], conn, nbytes: int) -> float:
    payload = memoryview(bytearray(TCP_CHUNK))
    conn.send(("tcp", nbytes))
    sock = socket.create_connection(sink)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    started = time.perf_counter()
    remaining = nbytes
    while remaining:
        n = min(TCP_CHUNK, remaining)
        sock.sendall(payload[:n])
        remaining -= n
    sock.recv(1)
    elapsed = time.perf_counter() - started
    sock.close()
    conn.recv()
    return nbytes / elapsed / 1e9


def _block_descs(agent, layers: list[torch.Tensor], tokens: int):
    """The prompt's blocks of every layer (blocks 0..n are contiguous in each layer)."""
    return agent.get_xfer_descs([layer[: tokens // BLOCK] for layer in layers])


def _nixl_once(agent, handle, conn, nbytes: int) -> float:
    # The consumer polls while the write runs: over UCX's TCP transport its side must progress too.
    conn.send(("nixl_wait",))
    started = time.perf_counter()
    if agent.transfer(handle) == "ERR":
        raise RuntimeError("NIXL transfer failed to start")
    while (state := agent.check_xfer_state(handle)) == "PROC":
        pass
    if state != "DONE":
        raise RuntimeError(f"NIXL transfer ended {state}")
    conn.recv()
    return nbytes / (time.perf_counter() - started) / 1e9


def _nixl_gbps(layers: list[torch.Tensor], conn, tokens: int, repeats: int) -> float | None:
    agent = _nixl_agent(f"producer-{uuid.uuid4().hex}", layers)
    conn.send(("nixl",))
    remote = conn.recv()
    if agent is None or remote is None:
        return None
    peer = agent.add_remote_agent(remote[0])
    handle = agent.initialize_xfer("WRITE", _block_descs(agent, layers, tokens), agent.deserialize_descs(remote[1]), peer, b"kv")
    try:
        _nixl_once(agent, handle, conn, tokens * TOKEN_BYTES)  # warm up
        return statistics.median(_nixl_once(agent, handle, conn, tokens * TOKEN_BYTES) for _ in range(repeats))
    finally:
        agent.release_xfer_handle(handle)
        agent.remove_remote_agent(peer)


def _memcpy_once(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in first
    started = time.perf_counter()
    dst.copy_(src)
    return nbytes / (time.perf_counter() - started) / 1e9


def measure(tokens: int, repeats: int, settings: KVEndpointSettings, consumer_host: tuple[str, str] | None = None) -> Row:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_consumer, args=(child, tokens, settings, consumer_host), daemon=True)
    proc.start()
    kv_endpoint, tcp_sink = parent.recv()
    layers = _paged_layers(tokens, fill=True)
    nbytes = tokens * TOKEN_BYTES
    transports = [t for t in TRANSPORTS if t != "nixl" or nixl_api()]
    producers = {
        transport: KVEndpoint(
            layers, layers[0].shape[0], BLOCK, settings.model_copy(update={"transport": transport}), produce=True, consume=False
        )
        for transport in transports
    }
    gbps = {}
    try:
        for transport, producer in producers.items():
            _kv_once(producer, kv_endpoint, parent, tokens)  # warm the connections up
            gbps[transport] = statistics.median(_kv_once(producer, kv_endpoint, parent, tokens) for _ in range(repeats))
        default_transport = next(iter(producers["auto"].stats.snapshot()["transfers_by_transport"]))
        tcp = statistics.median(_tcp_once(tcp_sink, parent, nbytes) for _ in range(repeats))
        nixl_write = _nixl_gbps(layers, parent, tokens, repeats)
        mem = statistics.median(_memcpy_once(nbytes) for _ in range(repeats))
        idle = _idle_cpu_pct((proc.pid, os.getpid()))
    finally:
        for producer in producers.values():
            producer.close()
        parent.send(("stop",))
        parent.recv()
        proc.join(10)
    return Row(tokens, nbytes, gbps["auto"], gbps["tcp"], gbps["grpc"], gbps.get("nixl"), default_transport, tcp, mem, nixl_write, idle)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _idle_cpu_pct(pids: tuple[int, int], seconds: float = 3.0) -> tuple[float, float]:
    """CPU use of whole processes (every endpoint thread, NIXL's included) while nothing moves:
    a polling or spinning transport shows here."""
    before = [_cpu_seconds(pid) for pid in pids]
    time.sleep(seconds)
    consumer, producer = (round(100 * (_cpu_seconds(pid) - b) / seconds, 1) for pid, b in zip(pids, before, strict=True))
    return consumer, producer


def main(json_output: bool = False, repeats: int = 3, sizes=SIZES, lab: str = "", hosts: tuple[str, str] = ("", ""), **overrides) -> int:
    """With `lab`, the producer runs on the lab's host hosts[0] and the consumer on hosts[1]:
    every path, raw TCP's included, crosses the link between them (NIXL over UCX's TCP)."""
    settings = KVEndpointSettings(**{k: v for k, v in overrides.items() if v is not None})
    consumer_host = (lab, hosts[1]) if lab else None
    if lab:
        # The hosts share this machine's memory: UCX would take its shared-memory transports
        # and NIXL would never touch the link. Its TCP transport only, as between real hosts.
        os.environ["UCX_TLS"] = "tcp"
        settings = settings.model_copy(update={"host": enter_network(lab, hosts[0])})
        print(f"across lab {lab}: producer on {hosts[0]} ({settings.host}), consumer on {hosts[1]}")
    print(f"KV transfer: {settings.streams_per_transfer} streams, {settings.chunk_bytes / 2**20:g} MiB chunks; GB/s, median of {repeats}")
    print(
        f"{'tokens':>7} {'MiB':>6} {'KV default':>11} {'KV nixl':>8} {'KV tcp':>7} {'KV grpc':>8} {'raw TCP':>8} {'memcpy':>7} "
        f"{'NIXL WRITE':>11} {'ratio':>6} {'tcp ratio':>10} {'nixl/memcpy':>12}"
    )
    rows = []
    for tokens in sizes:
        r = measure(tokens, repeats, settings, consumer_host)
        rows.append(r)
        print(
            f"{r.tokens:>7} {r.nbytes / 2**20:>6.0f} {r.kv_gbps:>7.2f} ({r.default_transport:<4}) {_gbps(r.kv_nixl_gbps):>7} "
            f"{r.kv_tcp_gbps:>7.2f} {r.kv_grpc_stream_gbps:>8.2f} {r.tcp_gbps:>8.2f} {r.memcpy_gbps:>7.2f} "
            f"{_gbps(r.nixl_write_gbps):>11} {r.kv_gbps / r.tcp_gbps:>6.2f} {r.kv_tcp_gbps / r.tcp_gbps:>10.2f} "
            f"{_gbps(r.kv_nixl_gbps, r.memcpy_gbps):>12}",
            flush=True,
        )
    consumer_idle, producer_idle = max(r.idle_cpu_pct[0] for r in rows), max(r.idle_cpu_pct[1] for r in rows)
    print(f"idle CPU once transfers stop (% of a core, worst size): consumer endpoint {consumer_idle}, producer endpoints {producer_idle}")
    no_nixl = rows[0].kv_nixl_gbps is None
    if no_nixl:
        print("NIXL: not installed here (scripts/install.sh installs nixl-cu12)")
    ref = next((r for r in rows if r.tokens == 4096), rows[0])
    if json_output:
        print(
            json.dumps(
                {
                    "gbps": round(ref.kv_gbps, 3),
                    "default_transport": ref.default_transport,
                    "ceiling_gbps": round(ref.tcp_gbps, 3),
                    "ratio": round(ref.kv_gbps / ref.tcp_gbps, 3),
                    "tcp_path_gbps": round(ref.kv_tcp_gbps, 3),
                    "tcp_path_ratio": round(ref.kv_tcp_gbps / ref.tcp_gbps, 3),
                    "grpc_stream_gbps": round(ref.kv_grpc_stream_gbps, 3),
                    "grpc_stream_ratio": round(ref.kv_grpc_stream_gbps / ref.tcp_gbps, 3),
                    "memcpy_gbps": round(ref.memcpy_gbps, 3),
                    "nixl_gbps": None if no_nixl else round(ref.kv_nixl_gbps, 3),
                    "nixl_memcpy_ratio": None if no_nixl else round(ref.kv_nixl_gbps / ref.memcpy_gbps, 3),
                    "nixl_write_gbps": None if no_nixl else round(ref.nixl_write_gbps, 3),
                    "tokens": ref.tokens,
                    "idle_cpu_pct": {"consumer": consumer_idle, "producer": producer_idle},
                }
            )
        )
    return 0


def _gbps(value: float | None, per: float = 1.0) -> str:
    return "n/a" if value is None else f"{value / per:.2f}"
