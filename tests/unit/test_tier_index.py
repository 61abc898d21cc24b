"""The host KV tier's index: leading hits, least-recently-used eviction, forgetting a bad slot."""

from __future__ import annotations

from pdcluster.kv_transfer.tier_index import TierIndex


def test_hits_count_from_the_first_block_and_stop_at_a_gap():
    index = TierIndex(4)
    for h in (b"a", b"b", b"d"):
        assert index.place(h) is not None
    assert index.leading_hits([b"a", b"b", b"c", b"d"]) == 2
    assert index.leading_hits([b"c", b"a"]) == 0
    assert index.place(b"a") is None  # held already: nothing to store


def test_the_least_recently_used_block_is_evicted_and_its_slot_reused():
    index = TierIndex(2)
    slot_a, slot_b = index.place(b"a"), index.place(b"b")
    assert index.take([b"a"]) == [slot_a]  # a load makes a the most recently used
    assert index.place(b"c") == slot_b  # so b goes
    assert index.leading_hits([b"a"]) == 1 and index.leading_hits([b"b"]) == 0
    assert len(index) == 2


def test_a_dropped_block_is_forgotten_and_its_slot_freed():
    index = TierIndex(1)
    slot = index.place(b"a")
    index.drop(b"a")
    assert index.leading_hits([b"a"]) == 0
    assert index.place(b"b") == slot


def test_a_tier_without_slots_stores_nothing():
    assert TierIndex(0).place(b"a") is None
