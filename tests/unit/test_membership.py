"""The router's hold on workers across a registry restart (a Redis that comes back empty)."""

from __future__ import annotations

from pdcluster.router.membership import RestartGrace


def test_a_restart_keeps_missing_workers_for_one_record_lifetime_only():
    grace = RestartGrace(grace_s=5.0)
    assert grace.members("run-a", ["w1", "w2"], now=0.0) == ["w1", "w2"]
    # Without a restart a missing worker goes at once: its record expired, so it is dead.
    assert grace.members("run-a", ["w1"], now=1.0) == ["w1"]
    assert grace.members("run-a", ["w1", "w2"], now=2.0) == ["w1", "w2"]
    # Redis restarted empty: both are kept, and a new worker that announced is added.
    assert grace.members("run-b", [], now=3.0) == ["w1", "w2"]
    assert grace.members("run-b", ["w3"], now=4.0) == ["w1", "w2", "w3"]
    assert grace.members("run-b", ["w1", "w3"], now=7.9) == ["w1", "w2", "w3"]
    # One lifetime after the restart, a worker that never re-announced is gone.
    assert grace.members("run-b", ["w1", "w3"], now=8.0) == ["w1", "w3"]
