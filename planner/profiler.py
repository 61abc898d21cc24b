"""`pdcluster profile`: measure one engine replica on this machine's real vLLM engine and
the chosen KV transport, and fit the profile's step-cost model to it.

- prefill: one prompt alone at several lengths, and after a cached prefix: from its
  scheduling to its first token, by the engine's own per-request timestamps;
- decode: the step time of a batch of B requests at context L: the time per output token of
  the last of them to start decoding (its steps carry no prompt chunk), with the batch it
  really shared, for several B x L;
- KV bytes per token from the model's config, and the KV capacity vLLM allocated;
- transfer GB/s: this model's KV blocks between two KV endpoints on loopback, over the
  transport chosen (`auto`: NIXL where installed, else TCP);
- host KV tier GB/s: this model's KV blocks stored into a host KV tier and loaded back, as
  the connector copies them (`--kv-offloading-size`);
- the serving path's own costs, on a 1P+1D of the engine (`serving_path`).

The four step-cost coefficients are a non-negative least-squares fit to all samples in
relative error; the samples and the fit's error travel in the file.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
import uuid

import numpy as np

from pdcluster.common.engine_profile import EngineProfile, StepCost, prefill_pairs
from pdcluster.planner.serving_path import measure_serving_path
from pdcluster.worker.config import EngineConfig
from pdcluster.worker.engine_args import engine_kwargs, prepare_environment

DECODE_TOKENS = 48  # tokens timed past the first: enough that steps shared with other prompts are few


def fit_step_cost(rows: list[tuple[int, float, int]], seconds: list[float]) -> StepCost:
    """Non-negative least squares, in relative error, of seconds ~ [1, tokens, pairs, context]."""
    a = np.array([[1.0, t, p, c] for t, p, c in rows])
    y = np.array(seconds)
    a, y = a / y[:, None], np.ones_like(y)  # each sample weighs by its own size
    active = list(range(4))
    while True:
        coef = np.zeros(4)
        coef[active] = np.linalg.lstsq(a[:, active], y, rcond=None)[0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda i: coef[i]))
    return StepCost(base_s=coef[0], per_token_s=coef[1], per_prefill_pair_s=coef[2], per_decode_context_token_s=coef[3])


class _Engine:
    """vLLM's async engine as a worker hosts it (its engine core in its own process), with the
    worker's engine arguments; each call returns the requests' own timestamps."""

    def __init__(self, engine: EngineConfig) -> None:
        prepare_environment(engine)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.loop = asyncio.new_event_loop()
        args = AsyncEngineArgs(**engine_kwargs(engine), disable_log_stats=False)  # per-request timestamps
        self.llm = self.loop.run_until_complete(self._start(AsyncLLM, args))
        self.config = self.llm.vllm_config
        self.vocab = self.config.model_config.get_vocab_size()
        self._rng = random.Random(0)

    @staticmethod
    async def _start(cls, args):
        return cls.from_engine_args(args)

    def prompt(self, n: int) -> list[int]:
        return [self._rng.randrange(100, self.vocab - 1) for _ in range(n)]

    def run(self, prompts: list[list[int]], max_tokens: int) -> list:
        """Each request's engine timestamps (vLLM's RequestStateStats)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        async def one(prompt: list[int]):
            final = None
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex):
                final = out
            return final.metrics

        async def every():
            return await asyncio.gather(*(one(p) for p in prompts))

        return self.loop.run_until_complete(every())

    def prefill_seconds(self, prompt: list[int]) -> float:
        (stats,) = self.run([prompt], 1)
        return stats.first_token_ts - stats.scheduled_ts

    def close(self) -> None:
        self.llm.shutdown()
        # The engine's output handler still awaits its queue: end it in its own loop, or it
        # fails loudly when the process exits.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()


def _measure_prefill(engine: _Engine, lengths: list[int], repeats: int) -> list[dict]:
    samples = []
    for n in lengths:
        seconds = statistics.median(engine.prefill_seconds(engine.prompt(n)) for _ in range(repeats))
        samples.append({"tokens": n, "cached": 0, "seconds": seconds})
    return samples


def _measure_prefix_hits(engine: _Engine, total: int, cached: list[int], block_size: int) -> list[dict]:
    samples = []
    for c in cached:
        c -= c % block_size  # vLLM caches whole blocks
        prefix = engine.prompt(c)
        engine.run([prefix], 1)  # now cached
        seconds = engine.prefill_seconds(prefix + engine.prompt(total - c))
        samples.append({"tokens": total, "cached": c, "seconds": seconds})
    return samples


def _measure_decode(engine: _Engine, batches: list[int], contexts: list[int], capacity_tokens: int) -> list[dict]:
    samples = []
    for b in batches:
        for length in contexts:
            if b * (length + DECODE_TOKENS + 1) > capacity_tokens:
                continue
            stats = engine.run([engine.prompt(length) for _ in range(b)], 1 + DECODE_TOKENS)
            # The last request to get its first token decodes in steps that carry no prompt
            # chunk; the others, which started earlier, finish earlier: the batch it shared
            # is their mean overlap with its window.
            last = max(stats, key=lambda s: s.first_token_ts)
            window = last.last_token_ts - last.first_token_ts
            shared = sum(max(0.0, min(s.last_token_ts, last.last_token_ts) - max(s.first_token_ts, last.first_token_ts)) for s in stats)
            batch = shared / window if window > 0 else float(b)
            samples.append({"batch": round(batch, 3), "context": length, "seconds": window / DECODE_TOKENS})
    return samples


def measure_tier_gbps(layer_shape: tuple[int, ...], dtype, num_layers: int, block_size: int, repeats: int = 3) -> float:
    """KV blocks of this shape stored into a host KV tier (in host memory) and loaded back, as
    the connector does: GB/s over both copies, checksums included."""
    import torch

    from pdcluster.kv_transfer.host_kv_tier import HostKVTier
    from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout

    num_blocks = layer_shape[0]
    layers = [torch.randn(layer_shape).to(dtype) for _ in range(num_layers)]
    tier = HostKVTier(layers, PagedKVLayout.of(layers[0], num_blocks, block_size), num_blocks, "", "profile")
    blocks = list(range(num_blocks))
    nbytes = sum(t.numel() * t.element_size() for t in layers)
    rates = []
    try:
        for _ in range(repeats + 1):  # the first one faults the file's pages in
            started = time.perf_counter()
            tier.store(blocks, blocks)
            if tier.load(blocks, blocks):
                raise RuntimeError("a host KV tier block failed its checksum while profiling")
            rates.append(2 * nbytes / (time.perf_counter() - started) / 1e9)
    finally:
        tier.close()
    return statistics.median(rates[1:])


def measure_transfer_gbps(layer_shape: tuple[int, ...], dtype, num_layers: int, block_size: int, transport: str, repeats: int = 3) -> float:
    """KV of this shape between two endpoints on loopback, over `transport`: GB/s end to end."""
    import torch

    from pdcluster.kv_transfer.connector_metadata import SaveSpec
    from pdcluster.kv_transfer.kv_endpoint import KVEndpoint
    from pdcluster.kv_transfer.settings import KVEndpointSettings

    settings = KVEndpointSettings(transport=transport)
    num_blocks = layer_shape[0]
    producer_layers = [torch.randn(layer_shape).to(dtype) for _ in range(num_layers)]
    consumer_layers = [torch.zeros(layer_shape, dtype=dtype) for _ in range(num_layers)]
    producer = KVEndpoint(producer_layers, num_blocks, block_size, settings, produce=True, consume=False)
    consumer = KVEndpoint(consumer_layers, num_blocks, block_size, settings, produce=False, consume=True)
    blocks = list(range(num_blocks))
    nbytes = sum(t.numel() * t.element_size() for t in producer_layers)
    rates = []
    try:
        for _ in range(repeats + 1):  # the first one opens connections
            transfer_id = uuid.uuid4().hex
            consumer.receiver.expect(transfer_id, transfer_id, blocks, 0)
            spec = SaveSpec(transfer_id, transfer_id, consumer.address, blocks, 0, num_blocks, True, True, num_blocks)
            started = time.perf_counter()
            for layer in range(num_layers):
                producer.sender.add_layer(spec, layer)
            producer.sender.finalize(transfer_id)
            deadline = started + 60
            while not producer.sender.poll({transfer_id}):
                consumer.receiver.poll()
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"a profile transfer over {transport} did not finish in 60 s")
                time.sleep(0.0005)
            rates.append(nbytes / (time.perf_counter() - started) / 1e9)
            consumer.receiver.poll()
    finally:
        producer.close()
        consumer.close()
    return statistics.median(rates[1:])


def profile_engine(
    engine: EngineConfig,
    transport: str = "auto",
    quick: bool = False,
    cost_per_hour: float = 0.0,
    name: str = "",
    serving_path: bool = True,
) -> EngineProfile:
    """Measure `engine` here and fit its profile (without `serving_path`, its serving path stays 0)."""
    import torch

    e = _Engine(engine)
    config = e.config
    cache, sched, model = config.cache_config, config.scheduler_config, config.model_config
    block_size = cache.block_size
    capacity = (cache.num_gpu_blocks or 0) * block_size
    budget = min(sched.max_num_batched_tokens, model.max_model_len - 1)
    repeats = 2 if quick else 3
    lengths = sorted({n for n in (16, 64, 256, 512, 1024, 2048) if n <= budget} | {budget})
    if quick:
        lengths = lengths[:: max(1, len(lengths) // 3)]
    e.run([e.prompt(32)], 4)  # warm-up: first-call costs stay out of the samples
    prefill = _measure_prefill(e, lengths, repeats)
    hits = _measure_prefix_hits(e, budget, [budget // 4, budget // 2, 3 * budget // 4], block_size)
    batches = [1, 8, 32] if quick else [1, 4, 16, 32]
    batches = [b for b in batches if b <= sched.max_num_seqs]
    contexts = [c for c in ((128, 1024) if quick else (128, 1024, 2048)) if c + DECODE_TOKENS < model.max_model_len]
    decode = _measure_decode(e, batches, contexts, capacity)
    rows = [(s["tokens"] - s["cached"], prefill_pairs(s["tokens"] - s["cached"], s["cached"]), 0) for s in prefill + hits]
    rows += [(s["batch"], 0.0, s["batch"] * (s["context"] + DECODE_TOKENS // 2)) for s in decode]
    seconds = [s["seconds"] for s in prefill + hits + decode]
    step = fit_step_cost(rows, seconds)
    predicted = [step.seconds(*r) for r in rows]
    errors = sorted(abs(p - s) / s for p, s in zip(predicted, seconds, strict=True))
    layers = model.get_num_layers(config.parallel_config)
    kv_heads = model.get_num_kv_heads(config.parallel_config)
    head = model.get_head_size()
    dtype = model.dtype if isinstance(model.dtype, torch.dtype) else getattr(torch, str(model.dtype))
    kv_bytes = layers * kv_heads * head * 2 * dtype.itemsize
    transfer_blocks = max(1, min(cache.num_gpu_blocks or 1, -(-budget // block_size)))
    layer_shape = (transfer_blocks, kv_heads, block_size, 2 * head)
    gbps = measure_transfer_gbps(layer_shape, dtype, layers, block_size, transport)
    tier_gbps = measure_tier_gbps(layer_shape, dtype, layers, block_size)
    vocab = e.vocab
    e.close()
    tp = config.parallel_config.tensor_parallel_size
    if torch.cuda.is_available():
        hardware, gpus, short, cores = f"{tp} x {torch.cuda.get_device_name()}", tp, f"gpu-tp{tp}", 0
    else:
        cores = len(os.sched_getaffinity(0))
        hardware, gpus, short = f"CPU, {cores} cores", 0, f"cpu{cores}"
    measured = f"measured by `pdcluster profile` on {hardware}"
    profile = EngineProfile(
        name=name or f"{short}-{os.path.basename(model.model.rstrip('/'))}",
        estimate=False,
        hardware=hardware,
        model=model.model,
        tensor_parallel_size=tp,
        gpus_per_replica=gpus,
        cpu_cores=cores,
        block_size=block_size,
        max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens,
        max_model_len=model.max_model_len,
        kv_capacity_tokens=max(1, capacity),
        kv_bytes_per_token=kv_bytes,
        step=step,
        transfer_gbps=gbps,
        transfer_latency_s=0.0,
        tier_gbps=tier_gbps,
        cost_per_hour=cost_per_hour,
        sources={
            "step": f"{measured}: fitted to the samples under measurements (median relative error "
            f"{errors[len(errors) // 2]:.1%}, worst {errors[-1]:.1%})",
            "kv_capacity_tokens": f"{measured}: the KV blocks vLLM allocated",
            "kv_bytes_per_token": "the model's config: layers x KV heads x head size x 2 x dtype bytes",
            "transfer_gbps": f"{measured}: {transfer_blocks} blocks per layer between two KV endpoints on loopback, transport {transport}",
            "tier_gbps": f"{measured}: {transfer_blocks} blocks stored into a host KV tier in host memory and loaded back, checksums included",
            "cost_per_hour": "given with --cost-per-hour" if cost_per_hour else "not given (0)",
        },
        measurements={
            "prefill": prefill + hits,
            "decode": decode,
            "transfer_gbps": gbps,
            "tier_gbps": tier_gbps,
            "fit_relative_error": errors,
        },
    )
    if not serving_path:
        profile.sources["serving_path"] = "not measured (pdcluster profile --no-serving-path)"
        return profile
    profile.serving_path, profile.measurements["serving_path"] = measure_serving_path(engine, profile, transport, vocab, repeats + 1)
    profile.sources["serving_path"] = (
        f"{measured}: requests one at a time through a 1P+1D of this engine (both paths), each one's TTFT and gaps "
        "less the step model's prediction for it alone, median"
    )
    return profile
