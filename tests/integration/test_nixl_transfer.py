"""The NIXL data path on real NIXL agents (UCX, on DRAM, within a process or between two):
which path `auto` picks, the end-to-end checksum, a consumer restarted on the same address,
and peers killed in the middle of a transfer."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from pdcluster.common.ports import free_port
from pdcluster.kv_transfer.connector_metadata import SaveSpec
from pdcluster.kv_transfer.kv_transfer_service import KVClient
from pdcluster.kv_transfer.nixl_write_notice import NixlWriteNotice
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.protos import kv_transfer_pb2 as pb

from tests.support.kv_endpoint_process import EndpointProcess
from tests.support.kv_fakes import (
    DST_BLOCKS,
    NUM_BLOCKS,
    SRC_BLOCKS,
    assert_same_kv,
    endpoint,
    paged_layers,
    poll_consumer,
    send,
    wait_until,
)


def kv_bytes(ep) -> int:
    return NUM_BLOCKS * ep.layout.block_bytes * len(ep.layers)


@pytest.fixture
def endpoints():
    """Makes endpoints (producer: seeded KV; consumer: zeros) and closes them after the test."""
    made = []

    def make(consume: bool, **settings):
        ep = endpoint(paged_layers(seed=None if consume else 1), KVEndpointSettings(**settings), consume=consume)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.close()


def test_auto_writes_over_nixl_when_both_ends_have_it(endpoints):
    prod, cons = endpoints(False, transport="auto"), endpoints(True, transport="auto")
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    send(prod, cons.address)
    assert poll_consumer(cons) == ({"r1"}, set())
    assert_same_kv(prod, cons)
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}
    sent, received = prod.stats.snapshot(), cons.stats.snapshot()
    assert sent["bytes_sent_by_transport"] == {"nixl": kv_bytes(prod)} and sent["transfers_by_transport"] == {"nixl": 1}
    assert received["bytes_received_by_transport"] == {"nixl": kv_bytes(cons)} and received["transfers_by_transport"] == {"nixl": 1}
    assert received["checksum_failures"] == 0


def test_a_chunked_prompt_is_written_chunk_by_chunk(endpoints):
    """vLLM computes a long prompt in chunks, and each step holds only the blocks allocated so
    far: the consumer's reserved blocks (all of the prompt's) are the target, and each chunk
    lands before the next is computed."""
    prod, cons = endpoints(False, transport="nixl"), endpoints(True, transport="nixl")
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    chunks = [(0, 2), (2, NUM_BLOCKS)]
    for step, (start, end) in enumerate(chunks):
        spec = SaveSpec(
            "r1", "t1", cons.address, SRC_BLOCKS[:end], start, end, first=step == 0, final=end == NUM_BLOCKS, prompt_blocks=NUM_BLOCKS
        )
        for layer in range(len(prod.layers)):
            prod.sender.add_layer(spec, layer)
        with cons.receiver.transfers.lock:
            transfer = cons.receiver.transfers.get("t1")
        assert transfer is not None and not transfer.failure
        wait_until(lambda end=end: transfer.received[:, :end].all() or transfer.failure)
        assert not transfer.failure
    prod.sender.finalize("r1")
    assert poll_consumer(cons) == ({"r1"}, set())
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}  # the producer counts it once it is done
    assert_same_kv(prod, cons)
    assert prod.stats.snapshot()["bytes_sent_by_transport"] == {"nixl": kv_bytes(prod)}


def test_auto_sends_over_tcp_to_a_consumer_without_nixl(endpoints):
    prod, cons = endpoints(False, transport="auto"), endpoints(True, transport="tcp")
    assert cons.nixl is None and prod.nixl is not None
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    send(prod, cons.address)
    assert poll_consumer(cons) == ({"r1"}, set())
    assert_same_kv(prod, cons)
    assert cons.stats.snapshot()["bytes_received_by_transport"] == {"tcp": kv_bytes(cons)}


def test_nixl_asked_for_fails_clearly_against_a_consumer_without_it(endpoints):
    prod, cons = endpoints(False, transport="nixl"), endpoints(True, transport="tcp")
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    send(prod, cons.address)
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}  # blocks released
    assert prod.stats.snapshot()["transfers_failed"] == 1
    assert poll_consumer(cons) == ({"r1"}, {"r1"})  # aborted: recomputed at once
    assert not cons.layers[0].any()


def test_auto_stages_over_tcp_when_the_request_is_not_scheduled_in_time(endpoints):
    prod, cons = endpoints(False, transport="auto"), endpoints(True, transport="auto")
    send(prod, cons.address)  # the consumer has not scheduled r1: no blocks to write into
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}
    assert cons.receiver.staged_bytes == kv_bytes(cons)
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    assert poll_consumer(cons) == ({"r1"}, set())
    assert_same_kv(prod, cons)
    assert prod.stats.snapshot()["bytes_sent_by_transport"] == {"tcp": kv_bytes(prod)}


def test_a_corrupted_block_is_detected_and_recomputed_never_used(endpoints):
    prod, cons = endpoints(False, transport="nixl"), endpoints(True, transport="nixl")
    landed = cons.nixl_consumer.landed

    def corrupt_then_check(writer, notice):
        # The write has landed; flip one byte of its first block before the check runs.
        cons.layers[0].select(0, DST_BLOCKS[0]).view(-1)[5] += 1.0
        cons.nixl_consumer.landed = landed
        landed(writer, notice)

    cons.nixl_consumer.landed = corrupt_then_check
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    send(prod, cons.address)
    assert poll_consumer(cons) == ({"r1"}, {"r1"})
    stats = cons.stats.snapshot()
    assert stats["checksum_failures"] == 1 and stats["recomputes"] == 1 and stats["transfers_received"] == 0
    # The producer hears it when it reports its writes done, and lets its blocks go.
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}
    assert prod.stats.snapshot()["transfers_failed"] == 1


def test_a_consumer_restarted_on_its_address_is_never_written_with_stale_metadata(endpoints):
    port = free_port()
    prod = endpoints(False, transport="nixl")
    first = endpoints(True, transport="nixl", port=port)
    first.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    send(prod, first.address)
    assert poll_consumer(first) == ({"r1"}, set())
    assert prod.nixl.known_peer(first.address) == first.nixl.name
    first.close()  # its memory stays registered in this process: a stale write would land there

    second = endpoints(True, transport="nixl", port=port)
    assert second.address == first.address and second.nixl.name != first.nixl.name
    other_blocks = [1, 4, 6, 8, 12]
    second.receiver.expect("t2", "r2", other_blocks, 0)
    send(prod, second.address, "t2", "r2")
    assert poll_consumer(second) == ({"r2"}, set())
    assert prod.nixl.known_peer(second.address) == second.nixl.name
    for layer in range(len(prod.layers)):
        assert torch.equal(second.layout.pack(second.layers[layer], other_blocks), prod.layout.pack(prod.layers[layer], SRC_BLOCKS))
        assert not first.layout.pack(first.layers[layer], other_blocks).any()


def test_a_producer_killed_mid_write_fails_the_load_over_to_recompute():
    producer = EndpointProcess({"transport": "nixl"}, seed=1, consume=False)
    cons = endpoint(paged_layers(seed=None), KVEndpointSettings(transport="nixl", producer_lost_after_s=1.0), consume=True)
    try:
        cons.receiver.expect("t1", "r1", DST_BLOCKS, 0, producer=producer.address)
        spec = SaveSpec("r1", "t1", cons.address, SRC_BLOCKS, 0, NUM_BLOCKS, first=True, final=False, prompt_blocks=NUM_BLOCKS)
        producer.call("add_layers", spec, [0])  # the first layer is computed and written ...
        wait_until(lambda: cons.stats.snapshot()["bytes_received_by_transport"].get("nixl"))
        producer.kill()  # ... and the engine dies before the next
        assert poll_consumer(cons) == ({"r1"}, {"r1"})
        assert cons.stats.snapshot()["recomputes"] == 1
    finally:
        producer.close()
        cons.close()


def test_a_consumer_killed_mid_write_releases_the_producers_blocks(endpoints):
    consumer = EndpointProcess({"transport": "nixl"}, seed=None, consume=True)
    prod = endpoints(False, transport="auto", send_timeout_s=15.0, send_retries=1)
    try:
        consumer.call("expect", "t1", "r1", DST_BLOCKS, 0)
        spec = SaveSpec("r1", "t1", consumer.address, SRC_BLOCKS, 0, NUM_BLOCKS, first=True, final=True, prompt_blocks=NUM_BLOCKS)
        prod.sender.add_layer(spec, 0)
        wait_until(lambda: consumer.call("stats")["bytes_received_by_transport"].get("nixl"))
        consumer.kill()
        for layer in range(1, len(prod.layers)):
            prod.sender.add_layer(spec, layer)
        prod.sender.finalize("r1")
        assert wait_until(lambda: prod.sender.poll({"r1"}), timeout=40) == {"r1"}
        assert prod.stats.snapshot()["transfers_failed"] == 1 and prod.sender.pending == 0
    finally:
        consumer.close()
    # The producer is not wedged: the next consumer gets its KV.
    cons = endpoints(True, transport="auto")
    cons.receiver.expect("t2", "r2", DST_BLOCKS, 0)
    send(prod, cons.address, "t2", "r2")
    assert poll_consumer(cons) == ({"r2"}, set())
    assert_same_kv(prod, cons)


def test_blocks_a_live_producer_may_still_write_stay_held_until_its_writes_end(endpoints):
    prod, cons = endpoints(False, transport="nixl"), endpoints(True, transport="nixl")
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    spec = SaveSpec("r1", "t1", cons.address, SRC_BLOCKS, 0, NUM_BLOCKS, first=True, final=True, prompt_blocks=NUM_BLOCKS)
    prod.sender.add_layer(spec, 0)
    wait_until(lambda: cons.stats.snapshot()["bytes_received_by_transport"].get("nixl"))
    cons.receiver.cancel_request("r1")  # say its client went away
    time.sleep(0.5)
    # vLLM would give these blocks to another request; the producer may still write them.
    assert cons.receiver.poll() == (set(), set())
    for layer in range(1, len(prod.layers)):
        prod.sender.add_layer(spec, layer)
    prod.sender.finalize("r1")
    assert poll_consumer(cons) == ({"r1"}, {"r1"})  # released once its writes ended
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}
    assert cons.stats.snapshot()["recomputes"] == 0  # a cancel, not a failed load


def test_a_complete_transfer_stays_held_until_its_writer_ends_and_a_retry_writes_nothing(endpoints):
    """A retry (say its NixlWritten call was cut) may be writing again while the notices of the
    attempt before complete the transfer. Handed to vLLM then, the retry's write of the
    prompt's last block would land on the KV of the tokens the decode appends there."""
    cons = endpoints(True, transport="nixl")
    receiver, nixl = cons.receiver, cons.nixl_consumer

    def land_every_block(transfer_id: str) -> None:
        for layer in range(len(cons.layers)):
            checksum = cons.layout.checksum(cons.layers[layer], DST_BLOCKS)
            nixl.landed("writer", NixlWriteNotice(transfer_id, layer, 0, NUM_BLOCKS, checksum).encode())

    receiver.expect("t1", "r1", DST_BLOCKS, 0)
    assert nixl.allow_writer("t1", "writer", hold_s=60) is not None
    land_every_block("t1")
    time.sleep(0.2)
    assert receiver.poll() == (set(), set())  # complete, but the writer has not said it ended
    # The retry asks where to write: the consumer answers COMPLETE and the hold ends.
    request = pb.NixlTargetRequest(
        transfer_id="t1", producer_agent="writer", wait_ms=100, layout=cons.layout.signature, dtype=cons.layout.dtype_name, lease_ms=60_000
    )
    client = KVClient(KVEndpointSettings())
    reply = asyncio.run(client.nixl_target(cons.address, request))
    assert reply.status == pb.NixlTargetReply.COMPLETE and not reply.block_ids
    assert receiver.poll() == ({"r1"}, set())

    receiver.expect("t2", "r2", DST_BLOCKS, 0)
    nixl.allow_writer("t2", "writer", hold_s=60)
    land_every_block("t2")
    assert receiver.poll() == (set(), set())
    assert nixl.writes_ended("t2", "writer")  # the writer's writes ended: vLLM's now
    assert receiver.poll() == ({"r2"}, set())
