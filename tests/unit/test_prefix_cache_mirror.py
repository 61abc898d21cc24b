"""The prefill worker's prefix-cache mirror: vLLM's own KV events (its event classes, its
ZMQ publisher) in, the names routers give prompt blocks out."""

from __future__ import annotations

import asyncio

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, ZmqEventPublisher

from pdcluster.common.prefix_hashes import prompt_block_hashes
from pdcluster.kv_transfer.tier_scheduler import TIER_MEDIUM
from pdcluster.worker import prefix_cache_mirror
from pdcluster.worker.prefix_cache_mirror import PrefixCacheMirror

BLOCK = 4
PROMPT = list(range(100, 112))  # three full blocks


def stored(hashes, parent, tokens, medium="GPU") -> BlockStored:
    return BlockStored(
        block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BLOCK, lora_id=None, medium=medium, lora_name=None
    )


def batch(*events) -> KVEventBatch:
    return KVEventBatch(ts=0.0, events=list(events))


def test_blocks_get_the_names_routers_compute_from_the_prompt():
    mirror = PrefixCacheMirror()
    names = prompt_block_hashes(PROMPT, BLOCK)
    # vLLM stores the first two blocks in one event and the third (its parent: b"h2") later.
    first = mirror.apply(batch(stored([b"h1", b"h2"], None, PROMPT[:8])))
    assert not first.reset and list(first.stored) == names[:2] and first.block_size == BLOCK
    assert list(mirror.apply(batch(stored([b"h3"], b"h2", PROMPT[8:]))).stored) == names[2:]
    assert sorted(mirror.names) == sorted(names)
    # A block whose parent the mirror never saw cannot be named: it is left out.
    assert mirror.apply(batch(stored([b"x2"], b"unseen", [1, 2, 3, 4]))) is None
    removed = mirror.apply(batch(BlockRemoved(block_hashes=[b"h3", b"nothing"], medium="GPU")))
    assert list(removed.removed) == names[2:] and not removed.stored
    assert mirror.apply(batch(AllBlocksCleared())) == mirror.snapshot()
    assert mirror.snapshot().reset and not mirror.names


def test_a_name_leaves_only_with_its_last_block_and_a_batch_nets_out():
    mirror = PrefixCacheMirror()
    name = prompt_block_hashes(PROMPT[:4], BLOCK)
    # Two vLLM blocks with the same tokens (another request's cache salt, say): one name.
    assert list(mirror.apply(batch(stored([b"a"], None, PROMPT[:4]), stored([b"b"], None, PROMPT[:4]))).stored) == name
    assert mirror.apply(batch(BlockRemoved(block_hashes=[b"a"], medium="GPU"))) is None
    assert list(mirror.apply(batch(BlockRemoved(block_hashes=[b"b"], medium="GPU"))).removed) == name
    # Within one batch only the end counts: stored then evicted, or evicted then stored again,
    # leaves routers as they were.
    assert mirror.apply(batch(stored([b"c"], None, PROMPT[:4]), BlockRemoved(block_hashes=[b"c"], medium="GPU"))) is None
    mirror.apply(batch(stored([b"d"], None, PROMPT[:4])))
    assert mirror.apply(batch(BlockRemoved(block_hashes=[b"d"], medium="GPU"), stored([b"e"], None, PROMPT[:4]))) is None
    assert mirror.names == name


def test_the_host_tiers_blocks_are_named_apart_from_the_engines():
    mirror = PrefixCacheMirror()
    names = prompt_block_hashes(PROMPT, BLOCK)
    mirror.apply(batch(stored([b"h1", b"h2"], None, PROMPT[:8])))
    # The tier copies both blocks; the engine then evicts the second: routers learn both.
    update = mirror.apply(
        batch(stored([b"h1", b"h2"], None, PROMPT[:8], medium=TIER_MEDIUM), BlockRemoved(block_hashes=[b"h2"], medium="GPU"))
    )
    assert list(update.tier_stored) == names[:2] and list(update.removed) == names[1:2] and not update.stored
    # A tier block whose parent only the tier holds still gets its name.
    assert list(mirror.apply(batch(stored([b"h3"], b"h2", PROMPT[8:], medium=TIER_MEDIUM))).tier_stored) == names[2:]
    assert mirror.names == names[:1] and sorted(mirror.tier_names) == sorted(names)
    gone = mirror.apply(batch(BlockRemoved(block_hashes=[b"h1"], medium=TIER_MEDIUM)))
    assert list(gone.tier_removed) == names[:1] and not gone.removed  # the engine still has it
    snapshot = mirror.snapshot()
    assert snapshot.reset and list(snapshot.stored) == names[:1] and sorted(snapshot.tier_stored) == sorted(names[1:])
    # vLLM resetting its prefix cache clears the engine's blocks, not the tier's.
    assert list(mirror.apply(batch(AllBlocksCleared())).tier_stored) == list(snapshot.tier_stored)


async def test_routers_get_a_snapshot_then_changes_over_vllms_publisher(tmp_path):
    endpoint, replay = f"ipc://{tmp_path}/kv-events", f"ipc://{tmp_path}/kv-events-replay"
    publisher = ZmqEventPublisher(0, endpoint=endpoint, replay_endpoint=replay)
    names = prompt_block_hashes(PROMPT, BLOCK)
    mirror = PrefixCacheMirror()
    follower = None
    try:
        # Published before the worker listens (as while an engine starts): replayed to it.
        publisher.publish(batch(stored([b"h1"], None, PROMPT[:4])))
        await asyncio.sleep(0.5)
        follower = asyncio.create_task(mirror.follow(endpoint, replay))
        stream = mirror.watch()
        for _ in range(100):
            if mirror.names:
                break
            await asyncio.sleep(0.05)
        snapshot = await anext(stream)
        assert snapshot.reset and list(snapshot.stored) == names[:1]
        publisher.publish(batch(stored([b"h2", b"h3"], b"h1", PROMPT[4:])))
        update = await asyncio.wait_for(anext(stream), 10)
        assert list(update.stored) == names[1:]
        publisher.publish(batch(BlockRemoved(block_hashes=[b"h1"], medium="GPU")))
        assert list((await asyncio.wait_for(anext(stream), 10)).removed) == names[:1]
        assert mirror.missed_batches == 0
        await stream.aclose()
    finally:
        if follower is not None:
            follower.cancel()
        publisher.shutdown()


async def test_a_watcher_too_far_behind_is_ended_so_it_resyncs(monkeypatch):
    monkeypatch.setattr(prefix_cache_mirror, "WATCH_BACKLOG", 2)
    mirror = PrefixCacheMirror()
    stream = mirror.watch()
    assert (await anext(stream)).reset
    for i in range(3):
        mirror.publish(mirror.apply(batch(stored([bytes([i])], None, [i] * BLOCK))))
    got = [update async for update in stream]  # what fitted, then the end of the stream
    assert [list(u.stored) for u in got] == [prompt_block_hashes([i] * BLOCK, BLOCK) for i in range(2)]


def test_an_adapters_blocks_get_the_names_routers_give_that_adapters_prompts():
    mirror = PrefixCacheMirror()
    event = stored([b"l1", b"l2"], None, PROMPT[:8])
    event.lora_name = "tiny-lora"
    assert list(mirror.apply(batch(event)).stored) == prompt_block_hashes(PROMPT[:8], BLOCK, "tiny-lora")
    assert set(mirror.names).isdisjoint(prompt_block_hashes(PROMPT[:8], BLOCK))
