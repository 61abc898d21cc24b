"""`pdcluster profile`'s serving-path measurement: what the router, the Decode and Prefill RPCs,
the KV handoff and streaming add to the engines' own time.

A 1P+1D of the profiled engine runs on this machine (each worker on every core the profile
had, as `pdcluster serve` starts them), with two routers over the same workers: one sends every
prompt to the prefill worker, one computes every prompt on the decode worker. Requests go one
at a time. What each one measured (TTFT, gaps between tokens) less what the simulator predicts
for it alone on an idle 1P+1D of the step model is the path's cost; the medians are the
profile's `ServingPath`.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile

import aiohttp

from pdcluster.common.engine_profile import EngineProfile, ServingPath
from pdcluster.common.openai_stream import RequestResult, served_model, stream_request
from pdcluster.common.processes import stop_all, wait_ready
from pdcluster.common.worker_record import Role
from pdcluster.planner.local_cluster import start_pdcluster, start_router
from pdcluster.planner.simulator import ClusterShape, ClusterSimulation
from pdcluster.planner.workloads import RequestShape
from pdcluster.router.config import RouterConfig
from pdcluster.worker.config import EngineConfig

LENGTHS = (64, 256, 1024)  # prompt tokens (within the model's length)
OUTPUT_TOKENS = 16
WARM_UP = 2  # requests per path first, not counted: first-call costs stay out
# The routers: every prompt to the prefill worker, or every prompt on the decode worker.
BYPASS_BELOW = {True: 1, False: 1_000_000}


def predicted_alone(profile: EngineProfile, prompt_tokens: int, remote: bool) -> tuple[float, float]:
    """(TTFT, median gap) the simulator gives one request alone on an idle 1P+1D of `profile`,
    without any serving-path cost."""
    bare = profile.model_copy(update={"serving_path": ServingPath()})
    shape = ClusterShape(bare, bare, 1, 1, RouterConfig(bypass_prefill_below_tokens=BYPASS_BELOW[remote]))
    (outcome,) = ClusterSimulation(shape).run([RequestShape(0.0, prompt_tokens, OUTPUT_TOKENS)])
    return outcome.ttft, statistics.median(outcome.gaps)


def measure_serving_path(
    engine: EngineConfig, profile: EngineProfile, transport: str, vocab: int, repeats: int
) -> tuple[ServingPath, dict]:
    """Measure on a 1P+1D of `engine` here; returns the path's costs and the samples behind them."""
    cores = set(os.sched_getaffinity(0))
    log_dir = tempfile.mkdtemp(prefix="pdcluster-profile-serving-path-")
    started, remote_url = start_pdcluster(
        engine, [(Role.PREFILL, cores), (Role.DECODE, cores)], log_dir, ["--bypass-prefill-below", str(BYPASS_BELOW[True])], transport
    )
    try:
        workers = [p for p in started if p.role != "router"]
        local = start_router(engine.model, workers, ["--bypass-prefill-below", str(BYPASS_BELOW[False])], log_dir)
        started.append(local)
        return serving_path_through({True: remote_url, False: wait_ready(local).router.http}, profile, vocab, repeats)
    finally:
        stop_all(started)


def serving_path_through(urls: dict[bool, str], profile: EngineProfile, vocab: int, repeats: int) -> tuple[ServingPath, dict]:
    """Measure through two routers over one 1P+1D of the profiled engine: {True: the one that
    prefills every prompt remotely, False: the one that computes every prompt on decode}."""
    lengths = [n for n in LENGTHS if n + OUTPUT_TOKENS < profile.max_model_len]
    measured = asyncio.run(_one_at_a_time(urls, lengths, repeats, vocab))
    samples: dict[str, list] = {"remote": [], "local": []}
    for (remote, length), results in measured.items():
        ttft, gap = predicted_alone(profile, length, remote)
        for r in results:
            samples["remote" if remote else "local"].append(
                {
                    "prompt_tokens": length,
                    "ttft_s": r.ttft_s,
                    "predicted_ttft_s": ttft,
                    "gap_s": statistics.median(r.gaps_s),
                    "predicted_gap_s": gap,
                }
            )
    every = samples["remote"] + samples["local"]
    path = ServingPath(
        request_s=_median_excess(samples["local"], "ttft_s"),
        remote_request_s=_median_excess(samples["remote"], "ttft_s"),
        token_s=_median_excess(every, "gap_s"),
    )
    return path, samples


def _median_excess(samples: list[dict], field: str) -> float:
    return max(0.0, statistics.median(s[field] - s[f"predicted_{field}"] for s in samples))


async def _one_at_a_time(
    urls: dict[bool, str], lengths: list[int], repeats: int, vocab: int
) -> dict[tuple[bool, int], list[RequestResult]]:
    """Each path's requests, alternating paths; raises on a failed one."""
    rng = random.Random(0)
    results: dict[tuple[bool, int], list[RequestResult]] = {(remote, n): [] for remote in urls for n in lengths}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        models = {remote: await served_model(url) for remote, url in urls.items()}
        rounds = [(n, False) for _ in range(WARM_UP) for n in lengths[:1]] + [(n, True) for _ in range(repeats) for n in lengths]
        for length, counted in rounds:
            for remote, url in urls.items():
                prompt = [rng.randrange(10, vocab) for _ in range(length)]
                result = await stream_request(session, url, models[remote], prompt, OUTPUT_TOKENS, "")
                if not result.ok:
                    raise RuntimeError(f"serving-path measurement: a {length}-token request failed: {result.error}")
                if counted:
                    results[remote, length].append(result)
    return results
