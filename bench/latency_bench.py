"""`pdcluster bench latency`: the price of disaggregating, one request at a time.

On an idle machine, prompts of each length go one at a time, alternating, to (a) vLLM's own
OpenAI server (the ceiling: one engine, nothing in between) and to pdcluster's 1P+1D on the
same model and engine flags, (b) on the disaggregated path (every prompt to the prefill
worker) and (c) on the bypass path (every prompt on the decode worker alone), through two
routers over the same workers. Every process may use every core (at concurrency 1 only one
engine computes at a time), or with `pin_workers` the prefill worker the first core and the
decode worker the second, as two machines would, and vLLM's server the first core too. Prompts are random tokens, new each time, so no prefix cache helps.
It prints TTFT and ITL medians of each and what pdcluster adds to vLLM's.

With `lab`, the prefill and decode workers run on two hosts of a `pdcluster lab` (its link,
shaped or not, between them; UCX over TCP, as between machines), and this process, the
routers, vLLM's own server and the trace receiver on its head: vLLM's server is then the
prompt's prefill alone, with nothing crossing a link, and the disaggregated path's TTFT says
whether the layer-wise transfer still hides behind the prefill.

With traces (the default), every process exports OpenTelemetry spans (vLLM's
`--otlp-traces-endpoint`, vLLM's own server included, so both carry the same cost) to a
receiver here, each request in its own trace, and it prints where each path's time to first
token goes: the phases between the marks of `trace_phases`, and the HTTP and OpenAI layer
(the client's TTFT less the time between the router's, or vLLM's engine's, first and last mark).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import statistics
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp

from pdcluster.bench.compare_bench import start_colocated
from pdcluster.bench.trace_phases import engine_ttft_ms, marks, phases
from pdcluster.bench.trace_receiver import ReceivedSpan, TraceReceiver
from pdcluster.common.openai_stream import RequestResult, served_model, stream_request
from pdcluster.common.processes import stop_all, wait_ready
from pdcluster.common.worker_record import Role
from pdcluster.planner.local_cluster import start_pdcluster, start_router
from pdcluster.worker.config import EngineConfig

ROUTER_PATH_FLAGS = {"disaggregated": ["--bypass-prefill-below", "1"], "bypass": ["--bypass-prefill-below", "1000000"]}


@dataclass
class PathLatency:
    prompt_tokens: int
    path: str
    ttft_p50_ms: float
    itl_p50_ms: float
    requests: int
    added_ttft_p50_ms: float = 0.0  # over vLLM's own server's, same prompt length
    added_itl_p50_ms: float = 0.0
    phases_ms: list[tuple[str, float]] = field(default_factory=list)  # medians, from the traces


@dataclass
class _Sent:
    trace_id: str
    result: RequestResult


def _summary(prompt_tokens: int, path: str, results: list[RequestResult]) -> PathLatency:
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{path}, {prompt_tokens}-token prompts: {failed[0]}")
    gaps = [g for r in results for g in r.gaps_s]
    return PathLatency(
        prompt_tokens,
        path,
        statistics.median(r.ttft_s for r in results) * 1e3,
        statistics.median(gaps) * 1e3 if gaps else 0.0,
        len(results),
    )


async def _measure(
    urls: dict[str, str], lengths: list[int], requests: int, max_tokens: int, vocab: int, seed: int
) -> list[tuple[list[PathLatency], dict[str, list[_Sent]]]]:
    """Per prompt length: each path's summary, and its requests (each in its own trace)."""
    rng = random.Random(seed)
    rounds = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        models = {path: await served_model(url) for path, url in urls.items()}
        for length in [lengths[0], *lengths]:  # the first round warms every path up and is dropped
            sent: dict[str, list[_Sent]] = {path: [] for path in urls}
            for i in range(requests):
                order = list(urls) if i % 2 == 0 else list(reversed(urls))  # neither path always goes first
                for path in order:
                    prompt = [rng.randrange(10, vocab) for _ in range(length)]
                    trace_id = secrets.token_hex(16)
                    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
                    result = await stream_request(session, urls[path], models[path], prompt, max_tokens, "", traceparent)
                    sent[path].append(_Sent(trace_id, result))
            row = [_summary(length, path, [s.result for s in sent[path]]) for path in urls]
            for r in row:
                r.added_ttft_p50_ms, r.added_itl_p50_ms = r.ttft_p50_ms - row[0].ttft_p50_ms, r.itl_p50_ms - row[0].itl_p50_ms
            rounds.append((row, sent))
    return rounds[1:]


def _breakdown(path: str, sent: list[_Sent], receiver: TraceReceiver) -> list[tuple[str, float]]:
    """Median ms of each phase of the path's time to first token, from its requests' traces."""
    traces = [receiver.spans(s.trace_id) for s in sent]
    ttfts = [s.result.ttft_s * 1e3 for s in sent]
    if path == "vllm":  # one span: vLLM's engine's, from its arrival to the first token
        engine = [next((e for e in spans if e.name == "llm_request"), None) for spans in traces]
        timed = [(ttft, engine_ttft_ms(e)) for ttft, e in zip(ttfts, engine, strict=True) if e is not None]
        inside = [("engine_in -> engine_first_token", statistics.median(e for _, e in timed))] if timed else []
    else:
        inside = phases(traces)
        timed = [(ttft, m["router_first_token"]) for ttft, m in zip(ttfts, map(marks, traces), strict=True) if m]
    if not timed:
        return []
    return [("HTTP and the OpenAI layer, in and out", statistics.median(ttft - span for ttft, span in timed)), *inside]


# The spans one request of each path leaves at least (a NIXL handshake may add one).
SPANS_PER_REQUEST = {"vllm": 1, "bypass": 4, "disaggregated": 9}


def _all_exported(sent: dict[str, list[_Sent]], receiver: TraceReceiver) -> None:
    """Wait (bounded) until every request's spans are in: processes export in batches."""
    wanted = {s.trace_id: SPANS_PER_REQUEST[path] for path, group in sent.items() for s in group}

    def done(spans: list[ReceivedSpan]) -> bool:
        counts = Counter(s.trace_id for s in spans)
        return all(counts[trace_id] >= n for trace_id, n in wanted.items())

    receiver.wait_for(done, timeout_s=60.0)


def main(
    lengths: list[int],
    requests: int,
    max_tokens: int,
    model: str = "",
    json_output: bool = False,
    seed: int = 0,
    kv_transport: str = "auto",
    pin_workers: bool = False,
    traces: bool = True,
    lab: str = "",
    hosts: tuple[str, str] = ("prefill-1", "decode-1"),
) -> int:
    from transformers import AutoTokenizer

    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    model = model or str(ensure_tiny_model())
    head, placed = _on_lab(lab, hosts) if lab else ("127.0.0.1", {})
    receiver = TraceReceiver(host=head) if traces else None
    tracing = {"otlp_traces_endpoint": receiver.endpoint} if receiver else {}
    router_tracing = ["--otlp-traces-endpoint", receiver.endpoint] if receiver else []
    engine = EngineConfig(model=model, max_model_len=max(lengths) + max_tokens + 16, **tracing)
    cores = set(range(os.cpu_count() or 1))
    vocab = len(AutoTokenizer.from_pretrained(model))
    log_dir = tempfile.mkdtemp(prefix="pdcluster-bench-latency-")
    started = []
    try:
        # Pinned, the workers stand for two machines, and vLLM's server computes on the prefill
        # worker's core: the prompt's prefill alone, on the hardware the prefill pool has.
        colocated, vllm_url = start_colocated(engine, {0} if pin_workers else cores, log_dir)
        started.append(colocated)
        processes, disaggregated_url = start_pdcluster(
            engine,
            [(Role.PREFILL, {0}), (Role.DECODE, {1})] if pin_workers else [(Role.PREFILL, cores), (Role.DECODE, cores)],
            log_dir,
            [*ROUTER_PATH_FLAGS["disaggregated"], *router_tracing],
            kv_transport,
            placed,
        )
        started += processes
        workers = [p for p in processes if p.role != "router"]
        bypass_router = start_router(model, workers, [*ROUTER_PATH_FLAGS["bypass"], *router_tracing], log_dir)
        started.append(bypass_router)
        urls = {"vllm": vllm_url, "disaggregated": disaggregated_url, "bypass": wait_ready(bypass_router).router.http}
        rounds = asyncio.run(_measure(urls, lengths, requests, max_tokens, vocab, seed))
        if receiver is not None:
            _all_exported({path: [s for _, sent in rounds for s in sent[path]] for path in urls}, receiver)
            for row, sent in rounds:
                for r in row:
                    r.phases_ms = _breakdown(r.path, sent[r.path], receiver)
    finally:
        stop_all(started)
        if receiver is not None:
            receiver.close()
    measured = [r for row, _ in rounds for r in row]
    print(
        f"one request at a time, {max_tokens} output tokens, {requests} requests per path and length, KV over {kv_transport},"
        f" workers {'on a core each' if pin_workers else 'on every core'},"
        f"{f' across lab {lab} (prefill on {hosts[0]}, decode on {hosts[1]});' if lab else ''}"
        f" {'traced' if traces else 'untraced'}; ceiling = vLLM's own server"
    )
    print(f"{'prompt':>7} {'path':>14} {'TTFT p50 ms':>12} {'added':>8} {'ratio':>6} {'ITL p50 ms':>11} {'added':>7}")
    for r in measured:
        vllm_ttft = r.ttft_p50_ms - r.added_ttft_p50_ms
        print(
            f"{r.prompt_tokens:>7} {r.path:>14} {r.ttft_p50_ms:>12.1f} {r.added_ttft_p50_ms:>+8.1f} {r.ttft_p50_ms / vllm_ttft:>6.2f}"
            f" {r.itl_p50_ms:>11.2f} {r.added_itl_p50_ms:>+7.2f}"
        )
    if traces:
        print("\nwhere the time to first token goes (medians, ms):")
        for r in measured:
            print(f"{r.prompt_tokens:>7} {r.path:>14}: " + "; ".join(f"{name} {ms:.1f}" for name, ms in r.phases_ms))
    if json_output:
        print(json.dumps([asdict(r) for r in measured]))
    return 0


def _on_lab(lab: str, hosts: tuple[str, str]) -> tuple[str, dict[Role, tuple[str, list[str]]]]:
    """Move this process onto the lab's head (what it starts from now on runs there); returns
    the head's address and where each worker runs: its host's address and the command prefix
    that runs it there."""
    from pdcluster.lab.lab_hosts import enter_network, host_command, load

    os.environ["UCX_TLS"] = "tcp"  # as between machines: no shared memory across the link
    spec, _ = load(lab)
    placed = {role: (spec.host(host).address, host_command(lab, host, [])) for role, host in zip((Role.PREFILL, Role.DECODE), hosts)}
    return enter_network(lab, "head"), placed
