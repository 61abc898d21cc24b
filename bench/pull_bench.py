"""`pdcluster bench pull`: what a prefill worker's pull of a prefix from a peer costs, against
computing that prefix and against holding it already.

On a 1P+1D of the tiny model (eager, float32), for each prefix length, a conversation of that
length is computed on the decode worker alone (its KV then exists only there, as a turn's
answer does), and its next turn (the prefix and `new_tokens` more) is sent as the router would
send it, three ways, each timed from the Decode and Prefill calls to the first token:
- computed: the prefill worker computes the whole turn;
- pulled: it pulls the prefix from the decode worker (`Worker.SendPrefix`) and computes the rest;
- held (the ceiling): it holds the prefix in its own cache already (it prefilled it before).
Every sample is a new random conversation, so no other cache helps. The decode worker holds
the prefix in each case and receives only the turn's blocks past it.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

import grpc

from pdcluster.common.cluster_token import local_cluster_token
from pdcluster.common.processes import start_process, stop_all, wait_ready
from pdcluster.common.sample_wire import encode_sampling_params
from pdcluster.common.worker_auth import token_metadata
from pdcluster.common.worker_record import Role
from pdcluster.protos import worker_pb2, worker_pb2_grpc
from pdcluster.worker.config import EngineConfig, WorkerConfig, worker_args

MODES = ("computed", "pulled", "held")


@dataclass
class PullRow:
    prefix_tokens: int
    computed_ms: float  # TTFT p50, the prefill worker computes the whole turn
    pulled_ms: float  # it pulls the prefix from the decode worker
    held_ms: float  # it holds the prefix (the ceiling)


class _Workers:
    def __init__(self, prefill, decode) -> None:
        self.prefill, self.decode = prefill, decode
        self._metadata = token_metadata(local_cluster_token("pdcluster"))  # what hand-started workers share
        self._channels = [grpc.aio.insecure_channel(w.address) for w in (prefill, decode)]
        self._p, self._d = (worker_pb2_grpc.WorkerStub(c) for c in self._channels)
        self._one = encode_sampling_params(_greedy(1))

    async def decode_alone(self, prompt: list[int]) -> None:
        request = worker_pb2.DecodeRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, sampling_params=self._one)
        async for _ in self._d.Decode(request, metadata=self._metadata):
            pass

    async def turn(self, prompt: list[int], decode_holds: int, pull: int = 0) -> float:
        """Seconds to the first token of `prompt` over the prefill worker (pulling its first
        `pull` tokens from the decode worker)."""
        rid = uuid.uuid4().hex
        started = time.perf_counter()
        stream = self._d.Decode(
            worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=self._one, transfer_id=rid),
            metadata=self._metadata,
        )
        peer = worker_pb2.PeerPull(worker=self.decode.address, kv_endpoint=self.decode.kv_endpoint, tokens=pull) if pull else None
        target = worker_pb2.KVTransferTarget(
            transfer_id=rid, consumer_endpoint=self.decode.kv_endpoint, consumer_prefix_tokens=decode_holds
        )
        prefill = self._p.Prefill(
            worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=self._one, target=target, pull=peer),
            metadata=self._metadata,
        )
        first = None
        async for _ in stream:
            first = first or time.perf_counter() - started
        reply = await prefill
        if pull and reply.num_cached_tokens < pull:
            raise RuntimeError(f"the pull of {pull} tokens fell back to computing them ({reply.num_cached_tokens} cached)")
        assert first is not None
        return first

    async def block_size(self) -> int:
        """The prefill engine's KV block size: a pull moves whole blocks."""
        return (await self._p.Stats(worker_pb2.StatsRequest(), metadata=self._metadata, timeout=10)).block_size

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


async def _measure(
    workers: _Workers, block: int, prefix_tokens: int, new_tokens: int, samples: int, rng: random.Random, vocab: int
) -> PullRow:
    pulled = prefix_tokens // block * block
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(samples):
        for mode in MODES:  # interleaved: a slow moment of the machine falls on every mode alike
            prefix = [rng.randrange(10, vocab) for _ in range(prefix_tokens)]
            turn = prefix + [rng.randrange(10, vocab) for _ in range(new_tokens)]
            await workers.decode_alone(prefix)  # the conversation so far, on the decode worker only
            if mode == "held":
                await workers.turn(prefix, decode_holds=pulled)  # the prefill worker computes it too
            times[mode].append(await workers.turn(turn, decode_holds=pulled, pull=pulled if mode == "pulled" else 0))
    p50 = {mode: round(statistics.median(t) * 1e3, 1) for mode, t in times.items()}
    return PullRow(prefix_tokens, p50["computed"], p50["pulled"], p50["held"])


def main(prefix_tokens: list[int], new_tokens: int = 64, samples: int = 5, kv_transport: str = "auto", json_output: bool = False) -> int:
    from transformers import AutoTokenizer

    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    engine = EngineConfig(model=str(ensure_tiny_model()), enforce_eager=True, dtype="float32")
    vocab = len(AutoTokenizer.from_pretrained(engine.model))
    log_dir = tempfile.mkdtemp(prefix="pdcluster-bench-pull-")
    print(f"1 prefill + 1 decode worker, KV over {kv_transport} (logs in {log_dir})...", flush=True)
    processes = [
        start_process(role, worker_args(WorkerConfig(role=role, engine=engine, kv={"transport": kv_transport})), log_dir=log_dir)
        for role in (Role.PREFILL, Role.DECODE)
    ]
    try:
        prefill, decode = (wait_ready(p, timeout=600) for p in processes)

        async def run() -> list[PullRow]:
            workers = _Workers(prefill, decode)
            try:
                rng, block = random.Random(0), await workers.block_size()
                return [await _measure(workers, block, n, new_tokens, samples, rng, vocab) for n in prefix_tokens]
            finally:
                await workers.close()

        rows = asyncio.run(run())
    finally:
        stop_all(processes)
    print(f"\nTTFT p50 of a turn ({new_tokens} new tokens) whose prefix only the decode worker holds, {samples} samples each")
    print(f"{'prefix':>7} {'computed ms':>12} {'pulled ms':>10} {'held ms (ceiling)':>18} {'pulled / held':>14} {'computed / pulled':>18}")
    for r in rows:
        print(
            f"{r.prefix_tokens:>7} {r.computed_ms:>12.1f} {r.pulled_ms:>10.1f} {r.held_ms:>18.1f} "
            f"{r.pulled_ms / r.held_ms:>14.2f} {r.computed_ms / r.pulled_ms:>18.2f}"
        )
    if json_output:
        print(json.dumps({"kv_transport": kv_transport, "new_tokens": new_tokens, "samples": samples, "rows": [asdict(r) for r in rows]}))
    return 0
