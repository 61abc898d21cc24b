"""Which data paths a producer tries, chosen in one place, and how the sender walks them: the
first path that can carry a transfer does, and each transfer ends sent or failed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from pdcluster.kv_transfer.connector_metadata import SaveSpec
from pdcluster.kv_transfer.kv_io_loop import KVIOLoop
from pdcluster.kv_transfer.kv_sender import KVSender
from pdcluster.kv_transfer.kv_transfer_service import KVClient
from pdcluster.kv_transfer.outgoing_transfer import OutgoingState, OutgoingTransfer
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.transfer_stats import TransferStats
from pdcluster.kv_transfer.transports import transports_for

LAYERS = [torch.zeros(8, 2, 16, 64) for _ in range(2)]
LAYOUT = PagedKVLayout.of(LAYERS[0], 8, 16)


class FakeNixl:
    name = "nixl"


@pytest.mark.parametrize(
    "transport, has_nixl, names",
    [
        ("grpc", True, ["grpc"]),
        ("tcp", True, ["tcp"]),
        ("auto", True, ["nixl", "tcp"]),
        ("auto", False, ["tcp"]),
        ("nixl", True, ["nixl"]),
    ],
)
def test_the_configured_transport_decides_the_paths_tried(transport, has_nixl, names):
    settings = KVEndpointSettings(transport=transport)
    nixl = FakeNixl() if has_nixl else None
    assert [t.name for t in transports_for(settings, KVClient(settings), LAYERS, LAYOUT, nixl)] == names


def test_nixl_without_an_agent_is_refused():
    settings = KVEndpointSettings(transport="nixl")
    with pytest.raises(ValueError, match="NIXL agent"):
        transports_for(settings, KVClient(settings), LAYERS, LAYOUT, None)


class FakePath:
    """A data path that cannot carry anything (None), or takes every range as announced."""

    def __init__(self, name: str, carries: bool) -> None:
        self.name, self.carries = name, carries
        self.seen: list[OutgoingState] = []

    async def send(self, t: OutgoingTransfer) -> int | None:
        self.seen.append(t.state)
        if not self.carries:
            return None
        taken = 0
        while (r := await t.next_range()) is not None:
            taken += r[2] - r[1]
        return taken * LAYOUT.block_bytes


class FakeClient:
    def __init__(self) -> None:
        self.aborted: list[tuple[str, str]] = []

    async def abort(self, endpoint: str, transfer_id: str, reason: str) -> None:
        self.aborted.append((transfer_id, reason))


def send_one(paths) -> tuple[TransferStats, FakeClient]:
    io, client, stats, done = KVIOLoop(), FakeClient(), TransferStats(), threading.Event()
    sender = KVSender(io, client, paths, LAYOUT, KVEndpointSettings(send_timeout_s=5), stats, done)
    spec = SaveSpec("r1", "t1", "consumer:1", [3, 4, 5], 0, 3, first=True, final=True, prompt_blocks=3)
    for layer in range(len(LAYERS)):
        sender.add_layer(spec, layer)
    sender.finalize("r1")
    deadline = time.monotonic() + 5
    while not sender.poll({"r1"}):
        assert time.monotonic() < deadline, "the sender never handed the request's blocks back"
        done.wait(0.1)
    io.stop()
    io.loop.close()
    return stats, client


def test_the_first_path_that_can_carry_a_transfer_does():
    nixl, tcp = FakePath("nixl", carries=False), FakePath("tcp", carries=True)
    stats, client = send_one([nixl, tcp])
    assert nixl.seen and tcp.seen  # each asked once, in order
    snapshot = stats.snapshot()
    assert snapshot["transfers_by_transport"] == {"tcp": 1} and snapshot["transfers_sent"] == 1
    assert snapshot["bytes_sent_by_transport"] == {"tcp": 2 * 3 * LAYOUT.block_bytes}
    assert client.aborted == []


def test_a_transfer_no_path_carries_fails_and_is_aborted_at_the_consumer():
    stats, client = send_one([FakePath("nixl", carries=False)])
    assert stats.snapshot()["transfers_failed"] == 1
    assert [tid for tid, _ in client.aborted] == ["t1"] and "no data path" in client.aborted[0][1]


def test_an_outgoing_transfer_hands_out_ranges_until_every_one_is_announced_and_taken():
    async def run() -> list:
        t = OutgoingTransfer("r", "t", "e", [1, 2], 2, deadline=time.monotonic() + 5, ranges=[(0, 0, 2)])
        taken = [await t.next_range()]
        waiter = asyncio.ensure_future(t.next_range())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # the prompt is still being computed: more may come
        t.ranges.append((1, 0, 2))
        t.state = OutgoingState.ANNOUNCED
        t.changed.set()
        taken.append(await waiter)
        taken.append(await t.next_range())
        return taken

    assert asyncio.run(run()) == [(0, 0, 2), (1, 0, 2), None]
