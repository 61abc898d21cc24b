"""`bench compare`'s summary: DistServe's goodput over a sweep, and the goals per workload."""

from __future__ import annotations

from pdcluster.bench.compare_bench import Comparison, goals, goodput_rates, planned_workers
from pdcluster.bench.serve_bench import RateResult, goodput_rate
from pdcluster.common.worker_record import Role
from pdcluster.planner.plan import Candidate


def result(rate: float, attainment: float, itl_p99: float = 10.0) -> RateResult:
    return RateResult(rate, 40, 40, 0, 10.0, rate, 1.0, itl_ms={"p99": itl_p99}, slo_attainment=attainment)


def test_goodput_is_the_highest_rate_before_attainment_first_drops_under_90_percent():
    assert goodput_rate([result(1, 1.0), result(2, 0.95), result(3, 0.5), result(4, 0.92)]) == 2  # 4: noise after the fall
    assert goodput_rate([result(2, 0.9), result(1, 1.0)]) == 2  # in rate order, whatever the list's
    assert goodput_rate([result(1, 0.85), result(2, 1.0)]) == 0.0


def test_goals_allow_two_requests_of_noise_and_check_itl_on_prefill_heavy():
    rows = [
        Comparison("prefill-heavy", 1, result(1, 1.0, 40.0), result(1, 0.95, 10.0)),  # 2 of 40 below: noise
        Comparison("prefill-heavy", 2, result(2, 0.95, 40.0), result(2, 0.95, 15.0)),
        Comparison("prefill-heavy", 3, result(3, 0.5, 40.0), result(3, 0.9, 30.0)),
    ]
    assert goodput_rates(rows) == {"colocated": 2, "pdcluster": 3}
    g = goals("prefill-heavy", rows)
    assert g["attainment_never_below_colocated"] == {"rates_below": [], "met": True}
    assert g["goodput_rate_ratio"]["value"] == 1.5 and g["goodput_rate_ratio"]["met"]
    assert g["goodput_rate_ratio_prefill_heavy"]["met"]
    assert g["p99_itl_ratio"] == {"values": [0.25, 0.375, 0.75], "goal": 0.5, "met": False}
    rows[1].pdcluster.slo_attainment = 0.875  # 3 of 40 below co-located's: a miss
    g = goals("balanced", rows)
    assert g["attainment_never_below_colocated"] == {"rates_below": [2], "met": False} and "p99_itl_ratio" not in g
    # Co-located never reaches 90%: no ratio, and pdcluster (3 req/s) is ahead of it.
    assert goals("balanced", rows[2:])["goodput_rate_ratio"] == {"value": None, "goal": 1.0, "met": True}
    rows[2].pdcluster.slo_attainment = 0.5  # neither reaches 90%: a tie, not 1.5x
    assert goals("prefill-heavy", rows[2:])["goodput_rate_ratio"]["met"]
    assert not goals("prefill-heavy", rows[2:])["goodput_rate_ratio_prefill_heavy"]["met"]


def test_pdcluster_as_planned_serves_the_chosen_shape_and_must_match_co_located():
    colocated = Candidate(2, 2, 0, 1, 2, "core", 0.0, 0.0)
    split = Candidate(1, 1, 1, 1, 2, "core", 0.0, 0.0)
    assert planned_workers(colocated, [0, 1]) == [(Role.DECODE, {0, 1})]  # a decode pool alone
    assert planned_workers(split, [0, 1]) == [(Role.PREFILL, {0}), (Role.DECODE, {1})]
    rows = [
        Comparison("prefill-heavy", 1, result(1, 1.0), result(1, 0.5), result(1, 0.975)),
        Comparison("prefill-heavy", 2, result(2, 0.95), result(2, 0.5), result(2, 0.85)),
    ]
    assert rows[0].systems == ["colocated", "pdcluster", "planned"]
    assert goodput_rates(rows) == {"colocated": 2, "pdcluster": 0.0, "planned": 1}
    planned = goals("prefill-heavy", rows, "planned")
    # Only the goals of matching co-located: disaggregation's own are the fixed 1P+1D's.
    assert set(planned) == {"attainment_never_below_colocated", "goodput_rate_ratio"}
    assert planned["attainment_never_below_colocated"] == {"rates_below": [2], "met": False}
    assert planned["goodput_rate_ratio"] == {"value": 0.5, "goal": 1.0, "met": False}
