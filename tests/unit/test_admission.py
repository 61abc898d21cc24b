"""The router's admission queue: bounded, and served in vLLM's priority order (lower first,
arrival order within a priority); a client that leaves while queued costs nobody a slot."""

from __future__ import annotations

import asyncio

import pytest

from pdcluster.router.admission import AdmissionGate
from pdcluster.router.errors import Overloaded
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.worker_pool import WorkerPool


def gate(max_inflight: int, max_queue: int) -> AdmissionGate:
    return AdmissionGate(max_inflight, max_queue, RouterMetrics(WorkerPool([])))


async def run_in_turns(g: AdmissionGate, arrivals: list[tuple[str, int]], leaving: set[str] = frozenset()) -> list[str]:
    """One request holds the only slot while the others queue in `arrivals` order; returns the
    order they get the slot in."""
    order: list[str] = []
    release = asyncio.Event()

    async def request(name: str, priority: int) -> None:
        async with g.slot(priority):
            order.append(name)
            if name == "first":
                await release.wait()

    holder = asyncio.create_task(request("first", 0))
    await asyncio.sleep(0)
    queued = {}
    for name, priority in arrivals:
        queued[name] = asyncio.create_task(request(name, priority))
        await asyncio.sleep(0)
    for name in leaving:
        queued[name].cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, *queued.values(), return_exceptions=True)
    return order


def test_queued_requests_get_the_slot_by_priority_then_arrival():
    order = asyncio.run(run_in_turns(gate(1, 10), [("low-1", 5), ("low-2", 5), ("high", -1), ("normal", 0)]))
    assert order == ["first", "high", "normal", "low-1", "low-2"]


def test_a_client_that_leaves_while_queued_passes_its_turn_on():
    order = asyncio.run(run_in_turns(gate(1, 10), [("a", 0), ("b", 0), ("c", 0)], leaving={"b"}))
    assert order == ["first", "a", "c"]


def test_a_full_queue_refuses_and_the_slots_come_back():
    async def run() -> None:
        g = gate(1, 1)
        release = asyncio.Event()

        async def hold() -> None:
            async with g.slot():
                await release.wait()

        tasks = [asyncio.create_task(hold()), asyncio.create_task(hold())]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            g.check()  # one running, one queued: the queue is full
        release.set()
        await asyncio.gather(*tasks)
        async with g.slot():  # every slot came back
            pass

    asyncio.run(run())


def test_a_tenants_burst_does_not_starve_another_of_its_class():
    async def run() -> list[str]:
        g = gate(2, 20)
        order: list[str] = []
        release = asyncio.Event()

        async def request(name: str, tenant: str, tenant_class: int = 0) -> None:
            async with g.slot(0, tenant, tenant_class):
                order.append(name)
                await release.wait()

        tasks = [asyncio.create_task(request(f"a{i}", "a")) for i in range(8)]  # a's burst takes both slots, 6 queue
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request(f"b{i}", "b")) for i in range(2)]
        tasks.append(asyncio.create_task(request("gold", "c", tenant_class=-1)))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(run())
    # The lower class first; then the tenants of a class take turns.
    assert order[:2] == ["a0", "a1"] and order[2] == "gold"
    assert order[3:7] == ["a2", "b0", "a3", "b1"], order  # turns: a, b, a, b, then the rest of a's
    assert sorted(order) == sorted([f"a{i}" for i in range(8)] + ["b0", "b1", "gold"])
