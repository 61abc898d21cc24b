"""A replica's cold start phases from the marks the controller, its actor, its worker and the
router take."""

from __future__ import annotations

from pdcluster.common.start_marks import PHASES, StartMarks, start_phases


def test_phases_split_the_time_from_the_decision_to_the_first_token():
    marks = StartMarks(placed=101.0, process=101.5, main=106.0, engine=116.0, compile_s=4.0)
    phases = start_phases(100.0, marks, joined=117.5, routed=118.0, first_token=118.25)
    assert phases == {
        "placement": 1.0,
        "process start": 5.0,  # spawn and imports: from the placement to the worker's main
        "engine load": 6.0,  # its engine start less the compile
        "compile": 4.0,
        "registration": 1.5,
        "first route": 0.5,
        "first token": 0.25,
        "total": 18.25,
    }
    assert list(phases)[:-1] == list(PHASES) and sum(phases[p] for p in PHASES) == phases["total"]


def test_outside_ray_the_process_start_is_the_first_mark():
    marks = StartMarks(process=100.5, main=104.0, engine=110.0)
    phases = start_phases(100.0, marks, joined=111.0, routed=111.0, first_token=111.5)
    assert phases["placement"] == 0.5 and phases["process start"] == 3.5 and phases["total"] == 11.5
