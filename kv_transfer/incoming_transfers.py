"""The consumer's table of expected transfers, each with an explicit state.

A transfer becomes *expected* when the decode engine schedules its request and allocates
blocks for it. Whatever carries its KV (chunk streams into `KVReceiver`, NIXL writes into
`NixlConsumer`) marks blocks received here, under the table's lock; a lost producer
(`ProducerWatch`) fails them here. `sweep` hands ended transfers back to vLLM: finished,
and failed ones too, so it recomputes instead of waiting forever or using bad KV.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from opentelemetry.trace import Span

from pdcluster.common.tracing import CONSUMER, NO_SPAN, context_of, end_span, start_span
from pdcluster.kv_transfer.transfer_stats import TransferStats

logger = logging.getLogger(__name__)

_CLOSED_IDS_KEPT = 10_000


class IncomingState(StrEnum):
    """Where an expected transfer stands. Its blocks are vLLM's again only in the last two."""

    AWAITED = "awaited"  # blocks still to arrive, none refused
    LANDING = "landing"  # ended, but writes into its blocks (chunks, NIXL checks) are still in flight
    HELD = "held"  # ended, but its NIXL writer may still write into its blocks (until it says its writes ended)
    COMPLETE = "complete"  # every block arrived intact: vLLM decodes from it
    FAILED = "failed"  # deadline missed, aborted, mismatched, corrupt or cancelled: vLLM recomputes


class TransferNotWanted(Exception):
    """The consumer will not take this transfer (finished, failed, aborted or unknown)."""


@dataclass
class ExpectedTransfer:
    transfer_id: str
    request_id: str
    block_ids: list[int]
    first_block: int  # blocks before this are already in the local prefix cache
    deadline: float
    producer: str  # its KV endpoint; empty: unknown
    received: np.ndarray  # [layers, blocks] bool: which blocks of which layer arrived
    started: float = field(default_factory=time.monotonic)
    writers: int = 0  # writes into its blocks in progress; they must not be released meanwhile
    failure: str = ""
    transport: str = ""  # the data path its KV came by
    # NIXL: the producer agent allowed to write into its blocks, and until when its
    # one-sided writes may still land (the blocks stay held that long, complete or not,
    # unless it says its writes ended).
    nixl_writer: str = ""
    hold_until: float = 0.0
    span: Span = NO_SPAN  # from expected to handed back to vLLM, in its request's trace

    @property
    def complete(self) -> bool:
        return bool(self.received.all())

    @property
    def awaited(self) -> bool:
        return not self.failure and not self.complete

    def state(self, now: float) -> IncomingState:
        if self.awaited:
            return IncomingState.AWAITED
        if self.writers:
            return IncomingState.LANDING
        # A complete NIXL transfer stays held too until its writer says its writes ended: a
        # retry's write may still be landing on the prompt's last block, which the decode fills.
        if self.hold_until > now:
            return IncomingState.HELD
        return IncomingState.FAILED if self.failure else IncomingState.COMPLETE


class IncomingTransfers:
    """Expected transfers by id, and the ids of ended ones (did they complete). Callers that
    change a transfer hold `lock`, and set `progress` when one may have ended."""

    def __init__(self, layers: int, load_timeout_s: float, stats: TransferStats, progress: threading.Event) -> None:
        self.lock = threading.Lock()
        self.progress = progress  # wakes the engine to hand ended transfers back
        self._layers = layers
        self._load_timeout_s = load_timeout_s
        self._stats = stats
        self._expected: dict[str, ExpectedTransfer] = {}
        self._by_request: dict[str, str] = {}
        self._closed: OrderedDict[str, bool] = OrderedDict()

    # -- caller holds the lock ------------------------------------------------------------

    def add(
        self,
        transfer_id: str,
        request_id: str,
        block_ids: list[int],
        first_block: int,
        producer: str,
        trace: Mapping[str, str] | None = None,
    ) -> ExpectedTransfer:
        """`trace`: its request's W3C trace headers."""
        received = np.zeros((self._layers, len(block_ids)), dtype=bool)
        received[:, :first_block] = True
        transfer = ExpectedTransfer(
            transfer_id=transfer_id,
            request_id=request_id,
            block_ids=list(block_ids),
            first_block=first_block,
            deadline=time.monotonic() + self._load_timeout_s,
            producer=producer,
            received=received,
            span=start_span(
                "kv_transfer.receive",
                context_of(trace),
                CONSUMER,
                {"pdcluster.transfer_id": transfer_id, "pdcluster.kv_blocks": len(block_ids) - first_block},
            ),
        )
        if transfer_id in self._closed:  # its producer gave up before we got here
            transfer.failure = "aborted by the producer before the request was scheduled"
        self._expected[transfer_id] = transfer
        self._by_request[request_id] = transfer_id
        return transfer

    def get(self, transfer_id: str) -> ExpectedTransfer | None:
        return self._expected.get(transfer_id)

    def closed(self, transfer_id: str) -> bool | None:
        """None: never ended here (or long ago); else whether it completed."""
        return self._closed.get(transfer_id)

    def close(self, transfer_id: str, completed: bool = False) -> None:
        self._closed[transfer_id] = completed
        while len(self._closed) > _CLOSED_IDS_KEPT:
            self._closed.popitem(last=False)

    # -- take the lock themselves ----------------------------------------------------------

    def sweep(self) -> tuple[set[str], set[str]]:
        """Request ids whose loads ended since the last sweep: (finished, failed). Failed ones
        are finished too (vLLM's contract)."""
        now = time.monotonic()
        finished: set[str] = set()
        failed: set[str] = set()
        with self.lock:
            for transfer_id, t in list(self._expected.items()):
                if t.awaited and now > t.deadline:
                    t.failure = f"no complete KV within {self._load_timeout_s}s"
                state = t.state(now)
                if state not in (IncomingState.COMPLETE, IncomingState.FAILED):
                    continue
                del self._expected[transfer_id]
                self._by_request.pop(t.request_id, None)
                self.close(transfer_id, completed=state == IncomingState.COMPLETE)
                finished.add(t.request_id)
                t.span.set_attribute("pdcluster.kv_transport", t.transport)
                end_span(t.span, t.failure)
                if state == IncomingState.COMPLETE:
                    self._stats.transfer_done(t.transport, transfers_received=1, receive_seconds=now - t.started)
                    continue
                failed.add(t.request_id)
                if t.failure != "cancelled":
                    logger.warning("KV load of %s failed (%s): recomputing", transfer_id, t.failure)
                    self._stats.add(transfers_failed=1, recomputes=1)
        return finished, failed

    def cancel_request(self, request_id: str) -> bool:
        """The consumer's own request ended (aborted); stop taking its KV."""
        with self.lock:
            transfer_id = self._by_request.get(request_id)
            if transfer_id is None:
                return False
            t = self._expected[transfer_id]
            t.failure = t.failure or "cancelled"
            return True

    def waiting_producers(self) -> set[str]:
        """KV endpoints of the producers whose transfers are still awaited, or whose blocks are
        held for NIXL writes that may still land."""
        now = time.monotonic()
        with self.lock:
            return {t.producer for t in self._expected.values() if t.producer and (t.awaited or t.hold_until > now)}

    def fail_from(self, producer: str, reason: str, writes_stopped: bool) -> int:
        """Fail every transfer still awaited from `producer`; returns how many.
        `writes_stopped`: it is gone, so none of its NIXL writes can land any more."""
        with self.lock:
            ours = [t for t in self._expected.values() if t.producer == producer]
            waiting = [t for t in ours if t.awaited]
            for t in waiting:
                t.failure = reason
            held = [t for t in ours if t.hold_until] if writes_stopped else []
            for t in held:
                t.hold_until = 0.0
        if waiting or held:
            self.progress.set()
        return len(waiting)

    def nixl_active(self) -> bool:
        """Whether NIXL writes may still be landing here."""
        now = time.monotonic()
        with self.lock:
            return any(t.nixl_writer and (t.awaited or t.hold_until > now) for t in self._expected.values())

    @property
    def pending(self) -> int:
        with self.lock:
            return len(self._expected)
