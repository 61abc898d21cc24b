"""Per-request placement from the profile's predictions, on cases worked out by hand, and in
the simulator against always computing prompts on the prefill workers."""

from __future__ import annotations

import pytest

from pdcluster.common.prefix_hashes import prompt_block_hashes
from pdcluster.common.slo import SLO
from pdcluster.planner.simulator import ClusterShape, ClusterSimulation
from pdcluster.planner.workloads import RequestShape
from pdcluster.router.config import RouterConfig
from pdcluster.router.placement_prediction import LOCAL, REMOTE, PlacementPredictor
from pdcluster.router.routing_policy import PrefixIndex, place_prefill
from pdcluster.router.worker_load import DecodeStream

from tests.support.hand_profile import profile
from tests.support.worker_views import worker

NOW = 100.0
PROMPT = 500  # one step: 10 ms + 1 ms per token -> 0.51 s on an idle engine


def predictor(slo: SLO = SLO()) -> PlacementPredictor:
    p = profile()
    return PlacementPredictor(p, p, slo, clock=lambda: NOW)


def test_an_idle_cluster_computes_the_prompt_remotely_and_the_prediction_adds_up():
    pred = predictor()
    prefill, decode = worker("p", "prefill"), worker("d", "decode")
    chosen, other = pred.choose(prefill, decode, PROMPT, overlap=0)
    assert chosen.choice == REMOTE and other.choice == LOCAL  # both keep the SLOs: decode steps stay short
    # The prompt's step, its KV (500 tokens x 1000 B at 1 GB/s), then the decode worker's first step.
    assert chosen.ttft_s == pytest.approx(0.510 + 0.0005 + 0.011)
    assert other.ttft_s == pytest.approx(0.510)
    # A cached prefix is not computed again.
    assert pred.remote(prefill, decode, PROMPT, 400).ttft_s == pytest.approx(0.110 + 0.0005 + 0.011)
    # KV the decode worker holds is not sent: 100 tokens x 1000 B at 1 GB/s move.
    assert pred.remote(prefill, decode, PROMPT, 0, decode_held=400).ttft_s == pytest.approx(0.510 + 0.0001 + 0.011)


def test_a_prefill_backlog_sends_the_prompt_to_an_idle_decode_worker():
    prefill, decode = worker("p", "prefill", queued_prefill_tokens=2000), worker("d", "decode")
    chosen, other = predictor().choose(prefill, decode, PROMPT, 0)
    assert chosen.choice == LOCAL and chosen.misses(SLO()) == 0
    assert other.ttft_s == pytest.approx(0.020 + 2.0 + 0.5215)  # two chunks of queued prompt tokens first


def test_requests_decoding_near_their_tpot_limit_keep_the_prompt_away():
    slo = SLO(ttft_ms=1000, itl_ms=15)
    prefill, decode = worker("p", "prefill", queued_prefill_tokens=2000), worker("d", "decode")
    # 50 of 101 tokens in 0.5 s: 10 ms each so far, 11 ms a step from now on -> TPOT 10.6 ms;
    # a local prompt's 0.5 s stall would make it 15.6 ms.
    for _ in range(3):
        decode.load.streams.add(DecodeStream(max_tokens=101, tokens=50, first_token_at=NOW - 0.5))
    chosen, other = predictor(slo).choose(prefill, decode, PROMPT, 0)
    assert (chosen.choice, chosen.misses(slo)) == (REMOTE, 1)  # its own TTFT only
    assert (other.choice, other.tpot_misses) == (LOCAL, 3)


def test_when_both_miss_the_earlier_first_token_wins():
    prefill, decode = worker("p", "prefill", queued_prefill_tokens=5000), worker("d", "decode")
    decode.load.pending_prefill_tokens = 3000  # prompts this router sent it to compute
    chosen, other = predictor().choose(prefill, decode, PROMPT, 0)
    assert chosen.choice == LOCAL and chosen.ttft_s == pytest.approx(3.03 + 0.51) and other.ttft_s > chosen.ttft_s


def test_when_every_choice_misses_the_smaller_overshoot_wins():
    """Streams already past their TPOT SLO count for neither choice, but how much further a
    local prompt's stall would push them does: against a TTFT a little past its SLO, they
    keep the prompt away; against one far past it, they do not."""
    slo = SLO(ttft_ms=400, itl_ms=10)  # neither choice computes the prompt in time
    decode = worker("d", "decode")
    for _ in range(2):  # 12 ms a step from now on: past the 10 ms SLO already (17 ms over the run)
        decode.load.streams.add(DecodeStream(max_tokens=11, tokens=5, first_token_at=NOW - 0.1))
    # Local: 0.512 s, and a 0.5 s stall over 10 tokens adds 5 SLOs to each stream: 0.28 + 10.
    # Remote behind 690 queued tokens: 1.22 s, 2.06 SLOs past.
    chosen, other = predictor(slo).choose(worker("p", "prefill", queued_prefill_tokens=690), decode, PROMPT, 0)
    assert (chosen.choice, chosen.misses(slo), other.misses(slo)) == (REMOTE, 1, 1)
    assert chosen.excess(slo) == pytest.approx(2.06, abs=0.01) and other.excess(slo) == pytest.approx(10.28, abs=0.01)
    # Behind 5000 queued tokens (5.57 s, 12.9 SLOs past), the stall is the smaller overshoot.
    chosen, _ = predictor(slo).choose(worker("p", "prefill", queued_prefill_tokens=5000), decode, PROMPT, 0)
    assert chosen.choice == LOCAL


def test_observed_ttfts_correct_the_predictions_within_bounds():
    pred = predictor()
    for _ in range(30):
        pred.observe(REMOTE, pred.scale(REMOTE) * 1.0, 2.0)  # a profile from a machine twice as fast
    assert pred.scale(REMOTE) == pytest.approx(2.0, rel=0.01) and pred.scale(LOCAL) == 1.0
    for _ in range(60):
        pred.observe(LOCAL, pred.scale(LOCAL), 1000.0)
    assert pred.scale(LOCAL) == pytest.approx(10.0)
    pred.observe(LOCAL, 0.0, 1.0)  # nothing to learn from
    assert pred.scale(LOCAL) == pytest.approx(10.0)


def test_place_prefill_applies_rules_before_predictions():
    prompt = list(range(PROMPT))
    hashes = lambda bs: prompt_block_hashes(prompt, bs)  # noqa: E731
    prefill, decode = worker("p", "prefill", queued_prefill_tokens=2000), worker("d", "decode")
    index = PrefixIndex()
    placement = place_prefill([prefill], decode, PROMPT, index, hashes, RouterConfig(), predictor())
    assert placement.worker is None and placement.bypass == "predicted" and placement.basis == "prediction"
    assert index.overlap_blocks("p", hashes(16)) == 0  # not sent there: not recorded
    # --local-prefill-above-queued overrides the predictions.
    rule = place_prefill([prefill], decode, PROMPT, index, hashes, RouterConfig(local_prefill_above_queued_tokens=4000), predictor())
    assert rule.worker is prefill and rule.chosen is None and rule.basis == "default"
    # Short prompts skip prefill before anything is predicted.
    short = place_prefill([prefill], decode, 10, index, hashes, RouterConfig(), predictor())
    assert short.basis == "short_prompt" and short.chosen is None


def attainment(sim: ClusterSimulation, slo: SLO) -> float:
    good = [o for o in sim.outcomes if o.first_token >= 0 and o.ttft <= slo.ttft_s and o.tpot <= slo.itl_s]
    return len(good) / len(sim.outcomes)


def test_predicted_placement_keeps_more_requests_within_slos_than_always_remote():
    """A prefill-heavy burst on 1P+1D: always remote, prompts queue on the one prefill worker
    while the decode worker idles; predicted, the decode worker takes the prompts the queue
    would make late, as long as the requests it decodes keep their TPOT."""
    slo = SLO(ttft_ms=1500, itl_ms=60)
    # 0.81 s of prompt every 0.5 s: more than one engine computes, less than two.
    requests = [RequestShape(0.5 * i, 800, 20, seed=i) for i in range(30)]
    results = {}
    for name, router in (("remote", RouterConfig()), ("predicted", RouterConfig(profile="hand.json", slo=slo))):
        sim = ClusterSimulation(ClusterShape(profile(), profile(), 1, 1, router=router))
        sim.run(requests)
        results[name] = (attainment(sim, slo), sum(o.placement == "predicted" for o in sim.outcomes))
    assert results["remote"][1] == 0 and results["predicted"][1] > 0
    assert results["remote"][0] < 0.2 and results["predicted"][0] > 0.8  # 2 of 30 against 26 of 30
