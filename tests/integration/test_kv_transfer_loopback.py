"""KV transfer over real gRPC on loopback: exactness, ordering, faults and cleanup."""

import socket
import time

import pytest
import torch

from pdcluster.common.ports import free_port
from pdcluster.kv_transfer.chunk_header import KVChunkHeader, payload_checksum
from pdcluster.kv_transfer.settings import KVEndpointSettings

from tests.support.kv_fakes import (
    CUDA_SHAPE,
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
from tests.support.tcp_proxy import CorruptingProxy

# Tests of chunks on the wire (staging, a proxy in the path) run on the chunked data paths;
# NIXL's own are in test_nixl_transfer.
CHUNKED = ["tcp", "grpc"]


@pytest.fixture(params=["tcp", "grpc", "nixl"])
def transport(request):
    return request.param


@pytest.fixture
def pair(request, transport):
    settings = KVEndpointSettings(transport=transport, **getattr(request, "param", {}))
    prod = endpoint(paged_layers(seed=1), settings, consume=False)
    cons = endpoint(paged_layers(seed=None), settings, consume=True)
    yield prod, cons
    prod.close()
    cons.close()


@pytest.mark.parametrize("pair", [{"chunk_bytes": 8192}], indirect=True)  # one block a chunk
@pytest.mark.parametrize("steps", [1, 3])
def test_transfer_lands_in_the_allocated_blocks(pair, steps, transport):
    prod, cons = pair
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    send(prod, cons.address, steps=steps)
    finished, failed = poll_consumer(cons)
    assert finished == {"r1"} and not failed
    assert_same_kv(prod, cons)
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}  # blocks released
    nbytes = NUM_BLOCKS * prod.layout.block_bytes * len(prod.layers)
    assert prod.stats.snapshot()["bytes_sent"] == nbytes
    assert cons.stats.snapshot()["bytes_received"] == nbytes
    # the data path asked for is the one that carried it
    assert prod.stats.snapshot()["bytes_sent_by_transport"] == {transport: nbytes}
    assert cons.stats.snapshot()["bytes_received_by_transport"] == {transport: nbytes}
    assert cons.stats.snapshot()["transfers_received"] == 1


def test_layout_with_non_contiguous_blocks_is_packed_and_unpacked(transport):
    settings = KVEndpointSettings(transport=transport, chunk_bytes=8192)
    prod = endpoint(paged_layers(seed=1, shape=CUDA_SHAPE), settings, consume=False)
    cons = endpoint(paged_layers(seed=None, shape=CUDA_SHAPE), settings, consume=True)
    try:
        cons.receiver.expect("t1", "r1", DST_BLOCKS, 1)
        send(prod, cons.address)
        assert poll_consumer(cons) == ({"r1"}, set())
        assert_same_kv(prod, cons, start=1)
        assert not cons.layout.pack(cons.layers[0], DST_BLOCKS[:1]).any()  # cached block untouched
    finally:
        prod.close()
        cons.close()


@pytest.mark.parametrize("transport", CHUNKED)
def test_chunks_before_the_request_is_scheduled_are_staged(pair):
    prod, cons = pair
    send(prod, cons.address)
    assert wait_until(lambda: prod.sender.poll({"r1"}))  # producer freed once staged
    assert cons.receiver.staged_bytes == NUM_BLOCKS * prod.layout.block_bytes * len(prod.layers)
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    assert poll_consumer(cons) == ({"r1"}, set())
    assert cons.receiver.staged_bytes == 0
    assert_same_kv(prod, cons)


@pytest.mark.parametrize("transport", CHUNKED)
def test_chunk_arriving_while_its_request_is_scheduled_is_not_stranded(pair):
    prod, cons = pair
    layout, src = prod.layout, prod.layers[0]
    parts = layout.payload_parts(src, SRC_BLOCKS[:1], into=None)
    header = KVChunkHeader(
        "t1", 0, 0, 1, layout.dtype_name, layout.block_bytes, layout.signature, layout.block_bytes, payload_checksum(*parts)
    )
    landing = cons.receiver.land(header, "tcp")  # not scheduled yet: lands in staging
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)  # scheduled before the bytes are in
    landing.parts[0][:] = parts[0]
    cons.receiver.landed(landing)
    assert cons.receiver.staged_bytes == 0
    assert torch.equal(layout.pack(cons.layers[0], DST_BLOCKS[:1]), layout.pack(src, SRC_BLOCKS[:1]))


def test_prefix_cached_blocks_are_left_alone(pair):
    """...and never sent: told that the consumer holds a prefix, every data path asks it which
    blocks it holds before sending."""
    prod, cons = pair
    cons.layers[0].select(0, DST_BLOCKS[0]).fill_(7.0)  # a block this engine had cached
    cached = cons.layout.pack(cons.layers[0], DST_BLOCKS[:2]).clone()
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 2)
    send(prod, cons.address, consumer_holds=1)
    assert poll_consumer(cons) == ({"r1"}, set())
    assert torch.equal(cons.layout.pack(cons.layers[0], DST_BLOCKS[:2]), cached)
    assert_same_kv(prod, cons, start=2)
    nbytes = (NUM_BLOCKS - 2) * prod.layout.block_bytes * len(prod.layers)
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}  # the send ended
    assert prod.stats.snapshot()["bytes_sent"] == cons.stats.snapshot()["bytes_received"] == nbytes


@pytest.mark.parametrize("transport", CHUNKED)
def test_corruption_in_flight_is_caught_and_resent(transport):
    settings = dict(transport=transport, chunk_bytes=8192, streams_per_transfer=1)
    data_port = free_port()
    # In front of the gRPC endpoint or of the raw-TCP data channel, whichever carries chunks.
    proxy = CorruptingProxy(f"127.0.0.1:{data_port}", corrupt_at=6000)  # inside the first 8 KiB payload
    prod = endpoint(paged_layers(seed=1), KVEndpointSettings(**settings), consume=False)
    cons = endpoint(
        paged_layers(seed=None), KVEndpointSettings(**settings, data_port=data_port, data_advertise=proxy.address), consume=True
    )
    grpc_proxy = CorruptingProxy(cons.address, corrupt_at=6000) if transport == "grpc" else None
    try:
        cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
        send(prod, grpc_proxy.address if grpc_proxy else cons.address)
        assert poll_consumer(cons) == ({"r1"}, set())
        assert (grpc_proxy or proxy).corrupted
        assert cons.stats.snapshot()["checksum_failures"] == 1
        assert prod.stats.snapshot()["send_retries"] == 1
        assert_same_kv(prod, cons)
    finally:
        for p in (proxy, grpc_proxy):
            if p:
                p.close()
        prod.close()
        cons.close()


@pytest.mark.parametrize("pair", [{"send_timeout_s": 2.0, "send_retries": 1}], indirect=True)
def test_unreachable_consumer_releases_producer_blocks(pair):
    prod, _ = pair
    send(prod, "127.0.0.1:9")  # nothing listens there
    assert wait_until(lambda: prod.sender.poll({"r1"})) == {"r1"}
    stats = prod.stats.snapshot()
    assert stats["transfers_failed"] == 1 and stats["bytes_sent"] == 0
    assert prod.sender.pending == 0


@pytest.mark.parametrize("pair", [{"load_timeout_s": 0.5}], indirect=True)
def test_consumer_gives_up_at_its_deadline(pair):
    _, cons = pair
    cons.receiver.expect("t-never", "r1", DST_BLOCKS, 0)
    finished, failed = poll_consumer(cons)
    assert finished == failed == {"r1"}
    assert cons.stats.snapshot()["recomputes"] == 1


@pytest.mark.parametrize("pair", [{"producer_lost_after_s": 1.0}], indirect=True)
def test_a_silent_producer_fails_its_loads_in_seconds_and_a_live_one_is_waited_for(pair, transport):
    prod, cons = pair
    frozen = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does) but never answers, like a SIGSTOPped engine
    try:
        silent = f"127.0.0.1:{frozen.getsockname()[1]}"
        cons.receiver.expect("t1", "r1", DST_BLOCKS, 0, producer=silent)
        cons.receiver.expect("t2", "r2", DST_BLOCKS, 0, producer=prod.address)
        started = time.monotonic()
        assert poll_consumer(cons) == ({"r1"}, {"r1"})
        print(f"silent producer detected after {time.monotonic() - started:.1f}s")
        time.sleep(3.0)  # several pings: the live producer answers, so its load is still awaited
        assert cons.receiver.poll() == (set(), set()) and cons.receiver.transfers.waiting_producers() == {prod.address}
        send(prod, cons.address, "t2", "r2")
        assert poll_consumer(cons) == ({"r2"}, set())
    finally:
        frozen.close()


def test_producer_abort_fails_the_load_at_once(pair):
    prod, cons = pair
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    prod.io.run(prod._client.abort(cons.address, "t1", "prefill failed"))
    assert poll_consumer(cons) == ({"r1"}, {"r1"})
    # an abort that comes before the decode engine schedules the request
    prod.io.run(prod._client.abort(cons.address, "t2", "prefill failed"))
    cons.receiver.expect("t2", "r2", DST_BLOCKS, 0)
    assert poll_consumer(cons) == ({"r2"}, {"r2"})


@pytest.mark.parametrize("pair", [{"auth_token": "s3cret"}], indirect=True)
def test_peer_without_the_cluster_token_is_refused(pair, transport):
    prod, cons = pair
    intruder = endpoint(paged_layers(seed=2), KVEndpointSettings(transport=transport, auth_token="wrong"), consume=False)
    try:
        cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
        send(intruder, cons.address)
        assert wait_until(lambda: intruder.sender.poll({"r1"}))
        assert intruder.stats.snapshot()["transfers_failed"] == 1
        assert not cons.layers[0].any()  # nothing was written
        send(prod, cons.address)  # the cluster's own producer still gets through
        assert poll_consumer(cons) == ({"r1"}, set())
    finally:
        intruder.close()


def test_kv_of_an_engine_that_differs_is_refused_and_its_load_fails_at_once(transport):
    """The router pairs only matching workers; should its view be stale, the consumer refuses
    KV from an engine whose compatibility digest differs, and fails the load at once (vLLM
    computes the prompt) instead of decoding from it."""
    ours = KVEndpointSettings(transport=transport, compatibility="c0ffee")
    cons = endpoint(paged_layers(seed=None), ours, consume=True)
    other = endpoint(paged_layers(seed=2), ours.model_copy(update={"compatibility": "decaf0"}), consume=False)
    same = endpoint(paged_layers(seed=1), ours, consume=False)
    try:
        cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
        send(other, cons.address)
        assert poll_consumer(cons) == ({"r1"}, {"r1"})
        assert not cons.layers[0].any()  # nothing was written
        assert wait_until(lambda: other.sender.poll({"r1"}))
        assert other.stats.snapshot()["transfers_failed"] == 1
        cons.receiver.expect("t2", "r2", DST_BLOCKS, 0)
        send(same, cons.address, transfer_id="t2", request_id="r2")  # an engine that matches gets through
        assert poll_consumer(cons) == ({"r2"}, set())
        assert_same_kv(same, cons)
    finally:
        other.close()
        same.close()
        cons.close()


@pytest.mark.parametrize("transport", CHUNKED)
@pytest.mark.parametrize("pair", [{"staged_ttl_s": 0.3}], indirect=True)
def test_orphaned_staged_kv_expires(pair):
    prod, cons = pair
    send(prod, cons.address)
    wait_until(lambda: prod.sender.poll({"r1"}))
    assert cons.receiver.staged_bytes > 0
    time.sleep(0.4)
    cons.receiver.poll()
    assert cons.receiver.staged_bytes == 0
    assert cons.stats.snapshot()["expired_leases"] == 1


@pytest.mark.parametrize("transport", CHUNKED)
@pytest.mark.parametrize("pair", [{"max_staged_bytes": 1000}], indirect=True)
def test_staging_is_bounded(pair):
    prod, cons = pair
    send(prod, cons.address)
    assert wait_until(lambda: prod.sender.poll({"r1"}))
    assert prod.stats.snapshot()["transfers_failed"] == 1
    assert cons.receiver.staged_bytes == 0


def test_cancelled_request_stops_taking_chunks(pair):
    prod, cons = pair
    cons.receiver.expect("t1", "r1", DST_BLOCKS, 0)
    assert cons.receiver.cancel_request("r1")
    assert poll_consumer(cons) == ({"r1"}, {"r1"})
    assert cons.stats.snapshot()["recomputes"] == 0  # a cancel is not a failed load
    send(prod, cons.address)
    assert wait_until(lambda: prod.sender.poll({"r1"}))
    assert prod.stats.snapshot()["transfers_failed"] == 1  # refused, not stranded
    assert not cons.layers[0].any()
