"""Where a prompt keeps both SLOs: predicted from the engine profile and the pool's live state.

For one prompt and its decode worker the router predicts
- remote: its TTFT if a prefill worker computes it (the prompt tokens queued there first, then
  this prompt less the prefix it holds, the transfer of the KV the decode worker lacks, and the
  decode worker's next step);
- local: its TTFT if the decode worker computes it (less the prefix it holds) in chunks beside
  its running requests, and
  what those chunks cost the requests decoding there: each chunked step is longer than a
  decode step, which stretches their time per output token (TPOT); the requests it would push
  past the TPOT SLO count against it.

It takes the choice under which fewest requests miss an SLO; on a tie, the one that overshoots
the SLOs least (the new request's TTFT past its SLO plus what it adds to the others' TPOT past
theirs, each in multiples of its SLO); then the remote one (decode steps stay short). Predictions are scaled
by how far off the last ones were (observed / predicted TTFT, per choice), so a profile
measured elsewhere still ranks the choices right once a few requests have been served.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdcluster.common.engine_profile import EngineProfile
from pdcluster.common.slo import SLO
from pdcluster.common.worker_load import decode_context_tokens
from pdcluster.router.worker_pool import WorkerView, queued_prefill_tokens

REMOTE, LOCAL = "remote", "local"
_CALIBRATION_WEIGHT = 0.2  # of each new observation in the running (geometric) mean ratio
_CALIBRATION_BOUNDS = (0.1, 10.0)


@dataclass
class Outlook:
    """One choice's predicted first token, and what it costs the requests decoding on the
    decode worker: how many it pushes past the TPOT SLO, and how far it moves them past it."""

    choice: str
    ttft_s: float
    tpot_misses: int = 0
    tpot_excess: float = 0.0  # added overshoot of their TPOTs, in multiples of the SLO, summed

    def misses(self, slo: SLO) -> int:
        return int(self.ttft_s > slo.ttft_s) + self.tpot_misses

    def excess(self, slo: SLO) -> float:
        return max(0.0, self.ttft_s / slo.ttft_s - 1) + self.tpot_excess


def decoding_requests(worker: WorkerView) -> int:
    return max(worker.stats.running, len(worker.load.streams))


def tpot_cost(worker: WorkerView, step_s: float, delay_s: float, slo: SLO, now: float) -> tuple[int, float]:
    """What a stall of `delay_s` does to the requests streaming from `worker` through this
    router, their remaining tokens taking `step_s` each: how many it pushes past the TPOT SLO
    (those past it anyway are not counted: neither choice saves them), and the overshoot it
    adds, in multiples of the SLO."""
    count, excess = 0, 0.0
    for stream in worker.load.streams:
        if stream.first_token_at is None or stream.max_tokens < 2:
            continue
        remaining = stream.max_tokens - stream.tokens
        without = (now - stream.first_token_at + remaining * step_s) / (stream.max_tokens - 1) / slo.itl_s
        with_stall = without + delay_s / (stream.max_tokens - 1) / slo.itl_s
        count += without <= 1 < with_stall
        excess += max(0.0, with_stall - 1) - max(0.0, without - 1)
    return count, excess


class PlacementPredictor:
    def __init__(self, prefill: EngineProfile, decode: EngineProfile, slo: SLO, clock: Callable[[], float] = time.monotonic) -> None:
        self.prefill_profile, self.decode_profile = prefill, decode
        self.slo = slo
        self.clock = clock  # the simulator runs the same decisions on its own clock
        self._log_ratio = {REMOTE: 0.0, LOCAL: 0.0}

    def scale(self, choice: str) -> float:
        return math.exp(self._log_ratio[choice])

    def observe(self, choice: str, predicted_s: float, observed_s: float) -> None:
        """A request's TTFT arrived: move the choice's correction toward observed / predicted."""
        if predicted_s <= 0 or observed_s <= 0:
            return
        raw = self._log_ratio[choice] + math.log(observed_s / predicted_s)  # predicted_s already scaled
        low, high = (math.log(b) for b in _CALIBRATION_BOUNDS)
        self._log_ratio[choice] = min(high, max(low, (1 - _CALIBRATION_WEIGHT) * self._log_ratio[choice] + _CALIBRATION_WEIGHT * raw))

    def remote(self, prefill: WorkerView, decode: WorkerView, prompt_len: int, overlap: int, decode_held: int = 0) -> Outlook:
        p, d = self.prefill_profile, self.decode_profile
        decoding, context = decoding_requests(decode), decode_context_tokens(decode.stats)
        ttft = (
            p.queued_prompt_seconds(queued_prefill_tokens(prefill))
            + p.prefill_seconds(prompt_len, cached=min(overlap, prompt_len - 1))
            + p.transfer_seconds(prompt_len - decode_held)  # held blocks are not sent
            + d.decode_step_seconds(decoding + 1, context + prompt_len)
        )
        return Outlook(REMOTE, ttft * self.scale(REMOTE))  # the decode worker's steps stay as they are

    def pull_saving_s(self, peer: WorkerView, prompt_len: int, have: int, pulled: int) -> float:
        """What taking the prompt's first `pulled` tokens from `peer` (the prefill worker holds
        `have`) saves against computing them: the prefill steps saved, less the peer's queued
        prompts, its last block and the transfer (negative: the pull is slower)."""
        p = self.prefill_profile
        computing = p.prefill_seconds(prompt_len, cached=have) - p.prefill_seconds(prompt_len, cached=pulled)
        pulling = p.queued_prompt_seconds(queued_prefill_tokens(peer)) + p.pull_seconds(pulled, pulled - have)
        return computing - pulling

    def local(self, decode: WorkerView, prompt_len: int, now: float, cached: int = 0) -> Outlook:
        p, scale = self.decode_profile, self.scale(LOCAL)
        decoding, context = decoding_requests(decode), decode_context_tokens(decode.stats)
        ahead = p.queued_prompt_seconds(queued_prefill_tokens(decode))
        steps = p.prefill_steps(prompt_len, cached, decoding=decoding, decode_context=context)
        step = p.decode_step_seconds(decoding, context)
        delay = (ahead + sum(steps) - len(steps) * step) * scale
        return Outlook(LOCAL, (ahead + sum(steps)) * scale, *tpot_cost(decode, step * scale, delay, self.slo, now))

    def choose(
        self, prefill: WorkerView, decode: WorkerView, prompt_len: int, overlap: int, decode_held: int = 0
    ) -> tuple[Outlook, Outlook]:
        """The chosen outlook first, then the other (`overlap`, `decode_held`: the prompt's prefix
        tokens the prefill and the decode worker hold)."""
        now = self.clock()
        remote, local = self.remote(prefill, decode, prompt_len, overlap, decode_held), self.local(decode, prompt_len, now, decode_held)
        if (local.misses(self.slo), local.excess(self.slo)) < (remote.misses(self.slo), remote.excess(self.slo)):
            return local, remote
        return remote, local
