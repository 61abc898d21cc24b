"""Routing decisions and admission control, on the router's own classes without workers."""

from __future__ import annotations

import asyncio

import pytest

from pdcluster.common.prefix_hashes import prompt_block_hashes
from pdcluster.router.admission import AdmissionGate
from pdcluster.router.config import RouterConfig
from pdcluster.router.errors import Overloaded
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.routing_policy import (
    PrefixIndex,
    pick_decode_worker,
    pick_prefill_worker,
    place_prefill,
    prefill_backlog_too_deep,
    should_bypass_prefill,
)
from pdcluster.router.worker_pool import WorkerPool

from tests.support.worker_views import BLOCK, worker


def pick_prefill(workers, prompt, index):
    return pick_prefill_worker(workers, len(prompt), index, lambda bs: prompt_block_hashes(prompt, bs), recompute_weight=1.0)


def test_block_hashes_follow_shared_prefixes():
    a = list(range(100))
    b = list(range(40)) + [7] * 60
    ha, hb = prompt_block_hashes(a, BLOCK), prompt_block_hashes(b, BLOCK)
    assert len(ha) == 100 // BLOCK  # the partial last block is not cacheable
    assert ha[:2] == hb[:2] and ha[2] != hb[2]  # blocks 0-1 are shared, block 2 diverges at token 40
    assert prompt_block_hashes(a[: BLOCK - 1], BLOCK) == []
    # A block's hash depends on everything before it, not only its own tokens.
    assert prompt_block_hashes([1] * BLOCK + [2] * BLOCK, BLOCK)[1] != prompt_block_hashes([3] * BLOCK + [2] * BLOCK, BLOCK)[1]


def test_prefix_index_counts_leading_blocks_and_forgets_oldest():
    index = PrefixIndex(capacity_blocks=4)
    index.record("w", [1, 2, 3])
    assert index.overlap_blocks("w", [1, 2, 9, 3]) == 2
    assert index.overlap_blocks("w", [9, 1, 2]) == 0
    assert index.overlap_blocks("other", [1]) == 0
    index.record("w", [4, 5])  # capacity 4: block 1 is the oldest and goes
    assert index.overlap_blocks("w", [1]) == 0
    assert index.overlap_blocks("w", [2, 3, 4, 5]) == 4
    index.remove("w", [3, 77])  # evicted by the worker (its KV events say so)
    assert index.overlap_blocks("w", [2, 3, 4]) == 1
    index.forget("w")
    assert index.overlap_blocks("w", [5]) == 0


def test_prefill_prefers_the_worker_holding_the_prefix():
    index = PrefixIndex()
    a, b = worker("a", "prefill"), worker("b", "prefill")
    shared = list(range(10 * BLOCK))
    index.record("b", prompt_block_hashes(shared, BLOCK))
    chosen, overlap = pick_prefill([a, b], shared + [1, 2, 3], index)
    assert chosen is b and overlap == 10 * BLOCK
    # Without a cached prefix the lighter-loaded worker wins.
    other = [5] * (4 * BLOCK)
    b.stats.queued_prefill_tokens = 500
    assert pick_prefill([a, b], other, index)[0] is a
    # Load outweighs affinity once the queue costs more than the prefix saves.
    b.stats.queued_prefill_tokens = 100 * BLOCK
    assert pick_prefill([a, b], shared, index)[0] is a


def test_recompute_weight_keeps_a_prefix_on_its_holder_against_a_shorter_queue():
    index = PrefixIndex()
    holder, idle = worker("holder", "prefill"), worker("idle", "prefill")
    prompt = list(range(10 * BLOCK)) + [1, 2, 3]
    index.record("holder", prompt_block_hashes(prompt, BLOCK))  # 10 of its blocks: 3 tokens to compute there
    holder.stats.queued_prefill_tokens = 15 * BLOCK  # queued there: more than the prefix saves (10 blocks)

    def hashes(block_size: int) -> list[int]:
        return prompt_block_hashes(prompt, block_size)

    def pick(weight: float):
        return pick_prefill_worker([holder, idle], len(prompt), index, hashes, recompute_weight=weight)[0]

    assert pick(1.0) is idle  # 15 blocks queued outweigh 10 blocks recomputed, token for token
    assert pick(2.0) is holder  # recomputing 10 blocks weighs 20: the prefix stays where it is
    holder.stats.queued_prefill_tokens = 25 * BLOCK
    assert pick(2.0) is idle  # a queue longer than that still sends it away
    assert RouterConfig().recompute_weight == 2.0  # the router's choice (place_prefill passes it)
    config = RouterConfig(bypass_prefill_below_tokens=0)
    decode = worker("d", "decode")
    holder.stats.queued_prefill_tokens = 15 * BLOCK
    placement = place_prefill([holder, idle], decode, len(prompt), index, hashes, config)
    assert placement.worker is holder and placement.overlap_tokens == 10 * BLOCK


def test_a_turn_whose_decode_worker_holds_all_but_a_short_rest_is_computed_there():
    index = PrefixIndex()
    prefill, decode = worker("p", "prefill"), worker("d", "decode")
    earlier = list(range(10 * BLOCK))  # the conversation so far, its KV on the decode worker (its events said so)
    index.record("d", prompt_block_hashes(earlier, BLOCK), shared=False)
    config = RouterConfig()  # --bypass-prefill-below 64

    def place(prompt: list[int], config: RouterConfig = config):
        return place_prefill([prefill], decode, len(prompt), index, lambda bs: prompt_block_hashes(prompt, bs), config)

    assert place(earlier + [1] * 40).bypass == "decode_holds_prefix"  # 40 new tokens: computed there, nothing moves
    remote = place(earlier + [1] * 200)
    assert remote.worker is prefill  # 200 new tokens: over a prefill worker, as any prompt,
    assert remote.decode_held_tokens == 10 * BLOCK  # and the producer is told the decode worker holds the rest
    other = [9] * (10 * BLOCK) + [1] * 40  # nothing of it on the decode worker
    assert place(other).worker is prefill and place(other).decode_held_tokens == 0
    assert place(earlier + [1] * 40, RouterConfig(prefill_routing="round-robin")).worker is prefill  # ignores holdings
    # Blocks in the decode worker's host KV tier count as held.
    index.remove("d", prompt_block_hashes(earlier, BLOCK)[5:])
    assert place(earlier + [1] * 40).worker is prefill
    index.update_tier("d", prompt_block_hashes(earlier, BLOCK)[5:], [])
    assert place(earlier + [1] * 40).bypass == "decode_holds_prefix"


def test_a_prefill_worker_pulls_a_long_prefix_a_peer_holds_when_that_saves_enough():
    index = PrefixIndex()
    busy = worker("busy", "prefill", kv_endpoint="busy:1", queued_prefill_tokens=400 * BLOCK)
    idle = worker("idle", "prefill", kv_endpoint="idle:1")
    decode = worker("d", "decode", kv_endpoint="d:1")
    conversation = list(range(100 * BLOCK))
    prompt = conversation + [1] * (20 * BLOCK + 3)  # a turn adding a long tool output
    hashes = prompt_block_hashes(prompt, BLOCK)
    config = RouterConfig(peer_pull_min_tokens=32 * BLOCK)

    def place(idle_holds: int = 10, **kwargs):
        index.forget("idle")  # what a placement records there is undone
        index.record("idle", hashes[:idle_holds], shared=False)
        return place_prefill([busy, idle], decode, len(prompt), index, lambda bs: prompt_block_hashes(prompt, bs), config, **kwargs)

    # The conversation so far is on the decode worker (a turn's answer exists only there); the
    # idle prefill worker holds its first 10 blocks: it pulls the other 90 from the decode worker.
    index.record("d", hashes[:100], shared=False)
    placement = place()
    assert placement.worker is idle and placement.overlap_tokens == 10 * BLOCK
    assert placement.pull is not None and placement.pull.peer is decode
    assert (placement.pull.tokens, placement.pull.held_tokens) == (100 * BLOCK, 10 * BLOCK)
    assert place(peer_pull=False).pull is None  # prompt logprobs: computed from the whole prompt
    # The longest prefix wins, in whole blocks short of the prompt's last token; a peer whose
    # queued prompts outweigh the tokens it would save is not asked.
    index.record("busy", hashes, shared=False)
    placement = place()
    assert placement.worker is idle and placement.pull is not None and placement.pull.peer is decode
    busy.stats.queued_prefill_tokens = 300 * BLOCK
    decode.stats.queued_prefill_tokens = 95 * BLOCK  # prompts bypassed to it
    placement = place()
    assert placement.worker is idle and placement.pull is None
    # Too little to gain, pulls off, round-robin (it knows no holdings): no pull.
    decode.stats.queued_prefill_tokens = 0
    assert place().pull is not None
    assert place(idle_holds=80).pull is None  # 20 blocks: under the 32-block minimum
    assert RouterConfig().peer_pull_min_tokens == 1024
    for config in (RouterConfig(peer_pull_min_tokens=0), RouterConfig(prefill_routing="round-robin")):
        assert place().pull is None


def test_a_prefix_in_a_workers_host_tier_counts_almost_as_cached():
    index = PrefixIndex()
    a, b, c = worker("a", "prefill"), worker("b", "prefill"), worker("c", "prefill")
    prompt = list(range(10 * BLOCK)) + [1, 2, 3]
    hashes = prompt_block_hashes(prompt, BLOCK)
    index.record("a", hashes[:2])  # its engine kept the first 2 blocks,
    index.update_tier("a", hashes[2:], [])  # its tier the rest
    index.update_tier("b", hashes, [])  # b's tier holds all 10
    chosen, overlap = pick_prefill([c, b], prompt, index)
    assert chosen is b and overlap == 10 * BLOCK  # loading beats computing
    index.record("c", hashes)
    assert pick_prefill([b, c], prompt, index)[0] is c  # a cache hit beats a tier hit
    assert pick_prefill([a, b], prompt, index) == (a, 10 * BLOCK)  # 2 blocks fewer to load
    index.update_tier("a", [], hashes[5:6])  # its tier let block 5 go: the rest cannot be used
    assert index.held_blocks("a", hashes) == 5
    assert pick_prefill([a, b], prompt, index)[0] is b
    index.forget("b")
    assert index.held_blocks("b", hashes) == 0


def test_placement_records_its_choice_except_round_robin():
    shared = list(range(4 * BLOCK))
    for routing in ("kv-events", "guess", "round-robin"):
        index, config = PrefixIndex(), RouterConfig(prefill_routing=routing)
        a, b = worker("a", "prefill"), worker("b", "prefill", queued_prefill_tokens=10 * BLOCK)
        index.record("b", prompt_block_hashes(shared, BLOCK))
        a.load.last_picked, b.load.last_picked = 2.0, 1.0
        placement = place_prefill([a, b], worker("d", "decode"), len(shared), index, lambda bs: prompt_block_hashes(shared, bs), config)
        if routing == "round-robin":  # in turn: neither the prefix b holds nor its queue counts
            assert placement.worker is b and placement.overlap_tokens == 0 and index.overlap_blocks("a", [1]) == 0
        else:  # a: less work ahead even after b's cached prefix; now a holds the prompt too
            assert placement.worker is a and index.overlap_blocks("a", prompt_block_hashes(shared, BLOCK)) == 4


def test_prefill_counts_work_the_router_sent_since_the_last_poll():
    a, b = worker("a", "prefill"), worker("b", "prefill")
    a.load.pending_prefill_tokens = 4000
    assert pick_prefill([a, b], list(range(64)), PrefixIndex())[0] is b
    assert pick_prefill([], list(range(64)), PrefixIndex()) == (None, 0)


def test_workers_equal_in_every_other_way_take_turns():
    # A prefill finishing before the next request arrives leaves both workers idle again: the
    # one picked least recently gets the next prompt instead of the first in the list.
    prompt = list(range(64))
    for role, pick in (
        ("prefill", lambda ws: pick_prefill(ws, prompt, PrefixIndex())[0]),
        ("decode", lambda ws: pick_decode_worker(ws, 100)),
    ):
        a, b = worker("a", role), worker("b", role)
        order = []
        for now in (1.0, 2.0, 3.0, 4.0):
            chosen = pick([a, b])
            chosen.load.last_picked = now
            order.append(chosen.address)
        assert order == ["a", "b", "a", "b"]


def test_decode_balances_load_and_needs_room():
    a = worker("a", "decode", running=5)
    b = worker("b", "decode", running=1)
    assert pick_decode_worker([a, b], 100) is b
    b.load.inflight = 9  # sent by this router, not yet in b's stats
    assert pick_decode_worker([a, b], 100) is a
    # A worker without room for the sequence loses even when idle.
    c = worker("c", "decode", free_kv_blocks=2)
    assert pick_decode_worker([a, c], 10 * BLOCK) is a
    # Ties on load go to the most free KV.
    d = worker("d", "decode", running=5, free_kv_blocks=1000)
    e = worker("e", "decode", running=5, free_kv_blocks=2000)
    assert pick_decode_worker([d, e], 100) is e
    assert pick_decode_worker([], 100) is None


def test_short_prompts_bypass_prefill():
    assert should_bypass_prefill(10, 64)
    assert not should_bypass_prefill(64, 64)
    assert not should_bypass_prefill(10, 0)


def test_a_deep_prefill_backlog_sends_the_prompt_to_the_decode_worker_only_when_enabled():
    busy = worker("p", "prefill", queued_prefill_tokens=3000)
    assert prefill_backlog_too_deep(busy, 2048)
    assert not prefill_backlog_too_deep(busy, 0)  # off by default
    assert not prefill_backlog_too_deep(worker("q", "prefill", queued_prefill_tokens=2048), 2048)
    # Our own count of prompts sent and not yet answered counts while the last poll lags.
    lagging = worker("r", "prefill")
    lagging.load.pending_prefill_tokens = 4096
    assert prefill_backlog_too_deep(lagging, 2048)


async def test_admission_gate_queues_then_refuses():
    pool = WorkerPool([])
    gate = AdmissionGate(max_inflight=1, max_queue=1, metrics=RouterMetrics(pool))
    release = asyncio.Event()
    order: list[str] = []

    async def hold(name: str) -> None:
        async with gate.slot():
            order.append(name)
            await release.wait()

    first = asyncio.create_task(hold("first"))
    await asyncio.sleep(0)
    queued = asyncio.create_task(hold("queued"))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        async with gate.slot():
            pass
    release.set()
    await asyncio.gather(first, queued)
    assert order == ["first", "queued"]
    async with gate.slot():  # free again
        pass
    await pool.close()


def test_a_lora_adapters_prompts_are_named_apart_from_the_base_models_and_each_others():
    prompt = list(range(4 * BLOCK))
    base, a, b = (prompt_block_hashes(prompt, BLOCK, name) for name in (None, "a", "b"))
    assert len({*base, *a, *b}) == 12  # no block shared across adapters
    assert prompt_block_hashes(prompt, BLOCK, "") == base


def test_routing_prefers_workers_holding_the_adapter_while_they_are_not_much_busier():
    for role, pick in (
        ("decode", lambda ws, lora: pick_decode_worker(ws, 100, lora)),
        ("prefill", lambda ws, lora: pick_prefill_worker(ws, 64, PrefixIndex(), lambda bs: [], lora, recompute_weight=2.0)[0]),
    ):
        holds = worker("holds", role, lora_adapters=["a"], running=2, queued_prefill_tokens=500)
        lacks = worker("lacks", role, running=0)
        assert pick([holds, lacks], "a") is holds
        assert pick([holds, lacks], None) is lacks  # the base model: load alone decides
        assert pick([holds, lacks], "b") is lacks
        # Far busier than a worker without it: the adapter's traffic spreads.
        busy = worker("busy", role, lora_adapters=["a"], running=9, queued_prefill_tokens=4000)
        assert pick([busy, lacks], "a") is lacks
