"""Consumer side of KV transfer: writes arriving chunks into the blocks vLLM allocated.

A transfer becomes *expected* when the decode engine schedules its request and allocates
blocks for it. Chunks that arrive earlier are staged in memory (bounded in bytes and
time) and written when the request is scheduled. Every expected transfer has a deadline;
a transfer that misses it, is aborted by its producer, or fails a check is reported as
failed so vLLM recomputes the prompt instead of waiting forever or using bad KV.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

from pdcluster.kv_transfer.chunk_header import ChunkChecksumError, ChunkError, KVChunkHeader, payload_checksum
from pdcluster.kv_transfer.nixl_write_notice import NixlWriteNotice
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout, tensor_bytes
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.transfer_stats import TransferStats

logger = logging.getLogger(__name__)

_CLOSED_IDS_KEPT = 10_000


class IncomingState(StrEnum):
    """Where an expected transfer stands. Its blocks are vLLM's again only in the last two."""

    AWAITED = "awaited"  # blocks still to arrive, none refused
    LANDING = "landing"  # ended, but chunk writes into its blocks are still in flight
    HELD = "held"  # ended, but its NIXL writer may still write into its blocks (until it says its writes ended)
    COMPLETE = "complete"  # every block arrived intact: vLLM decodes from it
    FAILED = "failed"  # deadline missed, aborted, mismatched, corrupt or cancelled: vLLM recomputes


class TransferNotWanted(Exception):
    """The consumer will not take this transfer (finished, failed, aborted or unknown)."""


class StagingFull(Exception):
    """Too many bytes are staged for transfers whose requests are not scheduled yet."""


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
    writers: int = 0  # chunk writes in progress; blocks must not be released meanwhile
    failure: str = ""
    transport: str = ""  # the data path its KV came by
    # NIXL: the producer agent allowed to write into its blocks, and until when its
    # one-sided writes may still land (the blocks stay held that long, complete or not,
    # unless it says its writes ended).
    nixl_writer: str = ""
    hold_until: float = 0.0

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


@dataclass
class ChunkLanding:
    """Where one chunk's payload is received; `parts` cover it, in order."""

    header: KVChunkHeader
    parts: list[memoryview]
    transfer: ExpectedTransfer | None  # None: staged, its request is not scheduled yet
    buffer: bytearray | None  # staging buffer, or the bytes to unpack from
    replay: bool  # a staged chunk written at last: its bytes were counted on arrival
    transport: str


@dataclass
class StagedTransfer:
    chunks: list[tuple[KVChunkHeader, bytearray]] = field(default_factory=list)
    nbytes: int = 0
    transport: str = ""
    created: float = field(default_factory=time.monotonic)


class KVReceiver:
    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        layout: PagedKVLayout,
        settings: KVEndpointSettings,
        stats: TransferStats,
        progress: threading.Event | None = None,
    ) -> None:
        self._progress = progress or threading.Event()  # set when a transfer completes or fails
        self._layers = list(layers)
        self._layout = layout
        self._settings = settings
        self._stats = stats
        self._lock = threading.Lock()
        self._expected: dict[str, ExpectedTransfer] = {}
        self._by_request: dict[str, str] = {}
        self._staged: dict[str, StagedTransfer] = {}
        self._staged_bytes = 0
        self._closed: OrderedDict[str, bool] = OrderedDict()  # ended transfers: did they complete

    # -- called by the engine thread --------------------------------------------------

    def expect(
        self,
        transfer_id: str,
        request_id: str,
        block_ids: list[int],
        first_block: int,
        producer: str = "",
    ) -> None:
        received = np.zeros((len(self._layers), len(block_ids)), dtype=bool)
        received[:, :first_block] = True
        transfer = ExpectedTransfer(
            transfer_id=transfer_id,
            request_id=request_id,
            block_ids=list(block_ids),
            first_block=first_block,
            deadline=time.monotonic() + self._settings.load_timeout_s,
            producer=producer,
            received=received,
        )
        with self._lock:
            if transfer_id in self._closed:  # its producer gave up before we got here
                transfer.failure = "aborted by the producer before the request was scheduled"
            self._expected[transfer_id] = transfer
            self._by_request[request_id] = transfer_id
            staged = self._staged.pop(transfer_id, None)
            if staged:
                self._staged_bytes -= staged.nbytes
        for header, payload in staged.chunks if staged else ():
            try:
                self._deliver(header, payload, staged.transport, replay=True)
            except (ChunkError, TransferNotWanted) as e:
                self.fail(transfer_id, str(e))
                break

    def cancel_request(self, request_id: str) -> bool:
        """The consumer's own request ended (aborted); stop taking its chunks."""
        with self._lock:
            transfer_id = self._by_request.get(request_id)
            if transfer_id is None:
                return False
            self._expected[transfer_id].failure = self._expected[transfer_id].failure or "cancelled"
            return True

    def poll(self) -> tuple[set[str], set[str]]:
        """Request ids whose loads ended since the last poll: (finished, failed).

        Failed ones are finished too (vLLM's contract); their blocks are released only
        once no chunk write is in flight.
        """
        now = time.monotonic()
        finished: set[str] = set()
        failed: set[str] = set()
        with self._lock:
            for transfer_id, t in list(self._expected.items()):
                if t.awaited and now > t.deadline:
                    t.failure = f"no complete KV within {self._settings.load_timeout_s}s"
                state = t.state(now)
                if state not in (IncomingState.COMPLETE, IncomingState.FAILED):
                    continue
                del self._expected[transfer_id]
                self._by_request.pop(t.request_id, None)
                self._close(transfer_id, completed=state == IncomingState.COMPLETE)
                finished.add(t.request_id)
                if state == IncomingState.COMPLETE:
                    self._stats.transfer_done(t.transport, transfers_received=1, receive_seconds=time.monotonic() - t.started)
                    continue
                failed.add(t.request_id)
                if t.failure != "cancelled":
                    logger.warning("KV load of %s failed (%s): recomputing", transfer_id, t.failure)
                    self._stats.add(transfers_failed=1, recomputes=1)
            self._expire_staged(now)
        return finished, failed

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._expected)

    @property
    def staged_bytes(self) -> int:
        with self._lock:
            return self._staged_bytes

    # -- called by the transport ------------------------------------------------------

    def on_chunk(self, header: KVChunkHeader, payload: bytes | memoryview, transport: str) -> bool:
        """Take one chunk already in memory. Returns whether its transfer is now complete.

        Raises ChunkError for a corrupted chunk (the producer may resend) or a mismatched
        one (the transfer fails), TransferNotWanted / StagingFull when it is refused.
        """
        return self._deliver(header, payload, transport, replay=False)

    def land(self, header: KVChunkHeader, transport: str, replay: bool = False) -> ChunkLanding:
        """Where to receive a chunk's payload: straight into its destination blocks when
        its request is scheduled and the layout keeps blocks contiguous, else a buffer.
        Follow with `landed` once the parts are filled, or `abandon`."""
        self._settings.check_token(header.auth_token)
        try:
            self._check_compatible(header)
        except ChunkError as e:
            self.fail(header.transfer_id, str(e))  # no retry can fix a mismatch
            raise
        start, end = header.block_start, header.block_start + header.num_blocks
        with self._lock:
            t = self._expected.get(header.transfer_id)
            if t is None:
                return self._reserve_staging(header, transport)
            if t.failure:
                raise TransferNotWanted(f"transfer {t.transfer_id} failed: {t.failure}")
            if end > len(t.block_ids):
                t.failure = f"chunk blocks {start}:{end} beyond the request's {len(t.block_ids)}"
                raise ChunkError(t.failure)
            t.writers += 1
        views = list(self._layout.views(self._layers[header.layer], t.block_ids[start:end]))
        if not all(v.is_contiguous() for v in views):
            buffer = bytearray(header.payload_bytes)
            return ChunkLanding(header, [memoryview(buffer)], t, buffer, replay, transport)
        # Blocks below first_block are shared prefix-cache blocks: land those in scratch.
        parts = [
            memoryview(bytearray(header.block_bytes)) if i < t.first_block else tensor_bytes(v) for i, v in zip(range(start, end), views)
        ]
        return ChunkLanding(header, parts, t, None, replay, transport)

    def landed(self, landing: ChunkLanding) -> bool:
        """Verify a filled landing; returns whether its transfer is now complete."""
        header, t = landing.header, landing.transfer
        if payload_checksum(*landing.parts) != header.checksum:
            # Corrupted in flight: refuse the stream; the producer resends from its held
            # blocks. Blocks already written stay unreceived until then.
            self._stats.add(checksum_failures=1)
            self.abandon(landing)
            raise ChunkChecksumError(
                f"checksum mismatch in transfer {header.transfer_id} layer {header.layer} blocks {header.block_start}+{header.num_blocks}"
            )
        if not landing.replay:
            self._stats.moved(landing.transport, received=header.payload_bytes)
        if t is None:
            with self._lock:
                if header.transfer_id not in self._expected:
                    staged = self._staged.setdefault(header.transfer_id, StagedTransfer(transport=landing.transport))
                    staged.chunks.append((header, landing.buffer))
                    staged.nbytes += header.payload_bytes
                    return False
                # Its request was scheduled while this chunk was arriving: write it now,
                # or it would sit in staging that expect() has already drained.
                self._staged_bytes -= header.payload_bytes
            return self._deliver(header, landing.buffer, landing.transport, replay=True)
        start, end = header.block_start, header.block_start + header.num_blocks
        if landing.buffer is not None:  # a layout that needs unpacking
            lo = max(start, t.first_block)
            skip = (lo - start) * header.block_bytes
            if lo < end:
                self._layout.unpack(memoryview(landing.buffer)[skip:], self._layers[header.layer], t.block_ids[lo:end])
        with self._lock:
            t.writers -= 1
            t.transport = t.transport or landing.transport
            t.received[header.layer, start:end] = True
            complete = t.complete
        if complete:
            self._progress.set()
        return complete

    def abandon(self, landing: ChunkLanding) -> None:
        """A landing that will not be completed (the connection broke, or it was bad)."""
        with self._lock:
            if landing.transfer is not None:
                landing.transfer.writers -= 1
            else:
                self._staged_bytes -= landing.header.payload_bytes

    def waiting_producers(self) -> set[str]:
        """KV endpoints of the producers whose transfers are still awaited, or whose blocks are
        held for NIXL writes that may still land."""
        now = time.monotonic()
        with self._lock:
            return {t.producer for t in self._expected.values() if t.producer and (t.awaited or t.hold_until > now)}

    def fail_from(self, producer: str, reason: str, writes_stopped: bool) -> int:
        """Fail every transfer still awaited from `producer`; returns how many.
        `writes_stopped`: it is gone, so none of its NIXL writes can land any more."""
        with self._lock:
            ours = [t for t in self._expected.values() if t.producer == producer]
            waiting = [t for t in ours if t.awaited]
            for t in waiting:
                t.failure = reason
            held = [t for t in ours if t.hold_until] if writes_stopped else []
            for t in held:
                t.hold_until = 0.0
        if waiting or held:
            self._progress.set()
        return len(waiting)

    def fail(self, transfer_id: str, reason: str, writes_stopped: bool = False) -> bool:
        """Fail a transfer; `writes_stopped`: its producer says no write of it is in flight."""
        with self._lock:
            transfer = self._expected.get(transfer_id)
            if transfer is None:
                staged = self._staged.pop(transfer_id, None)
                if staged:
                    self._staged_bytes -= staged.nbytes
                self._close(transfer_id)
                return staged is not None
            transfer.failure = transfer.failure or reason
            if writes_stopped:
                transfer.hold_until = 0.0
        self._progress.set()
        return True

    # -- NIXL one-sided writes ----------------------------------------------------------

    def nixl_target(self, transfer_id: str, writer: str, hold_s: float) -> ExpectedTransfer | None:
        """Let `writer` (a producer's NIXL agent) write this transfer's blocks; they stay held
        `hold_s` unless it reports its writes ended. None while the request is not scheduled.
        A complete transfer is returned as it is and written no more: a producer asks again
        only once its earlier writes ended, so its hold ends here."""
        with self._lock:
            t = self._expected.get(transfer_id)
            if t is None:
                if transfer_id in self._closed:
                    raise TransferNotWanted(f"transfer {transfer_id} is already closed")
                return None
            if t.failure:
                raise TransferNotWanted(f"transfer {transfer_id} failed: {t.failure}")
            complete = t.complete
            if complete:
                t.hold_until = 0.0
            else:
                t.nixl_writer, t.transport = writer, "nixl"
                t.hold_until = time.monotonic() + hold_s
        if complete:
            self._progress.set()
        return t

    def nixl_active(self) -> bool:
        """Whether NIXL writes may still be landing here (notifications need reading)."""
        now = time.monotonic()
        with self._lock:
            return any(t.nixl_writer and (t.awaited or t.hold_until > now) for t in self._expected.values())

    def nixl_landed(self, writer: str, message: bytes) -> None:
        """A write's notice: check the written blocks against its checksum and count them
        received, or fail the transfer so it is recomputed, never decoded."""
        try:
            notice = NixlWriteNotice.decode(message)
        except ChunkError as e:
            logger.warning("ignoring a NIXL notification from %s: %s", writer, e)
            return
        start, end = notice.block_start, notice.block_end
        with self._lock:
            t = self._expected.get(notice.transfer_id)
            if t is None or t.nixl_writer != writer or t.failure:
                return  # ended meanwhile, or not this agent's to write
            if notice.layer >= len(self._layers) or start < t.first_block or end > len(t.block_ids):
                t.failure = f"NIXL write notice names blocks outside the transfer ({notice})"
                self._progress.set()
                return
            t.writers += 1
        matches = False
        try:
            matches = self._layout.checksum(self._layers[notice.layer], t.block_ids[start:end]) == notice.checksum
        finally:
            with self._lock:
                t.writers -= 1
                if matches:
                    t.received[notice.layer, start:end] = True
                else:
                    t.failure = t.failure or f"KV checksum mismatch after a NIXL write (layer {notice.layer} blocks {start}:{end})"
                complete = t.complete
        if matches:
            self._stats.moved("nixl", received=(end - start) * self._layout.block_bytes)
        else:
            self._stats.add(checksum_failures=1)
        if complete or not matches:
            self._progress.set()

    def nixl_written(self, transfer_id: str, writer: str) -> bool:
        """The producer's writes of this transfer have all ended: release the hold. Returns
        whether every block arrived intact; raises TransferNotWanted with why not."""
        with self._lock:
            t = self._expected.get(transfer_id)
            if t is None and self._closed.get(transfer_id):
                return True  # complete, and already handed to vLLM
            if t is None or t.nixl_writer != writer:
                raise TransferNotWanted(f"transfer {transfer_id} is not awaited from this producer")
            t.hold_until = 0.0
            if t.failure:
                raise TransferNotWanted(f"transfer {transfer_id} failed: {t.failure}")
            complete = t.complete
        self._progress.set()  # a complete transfer is vLLM's now
        return complete

    # -- internals --------------------------------------------------------------------

    def _deliver(self, header: KVChunkHeader, payload: bytes | bytearray | memoryview, transport: str, replay: bool) -> bool:
        if len(payload) != header.payload_bytes:
            raise ChunkError(f"chunk payload is {len(payload)} bytes, header says {header.payload_bytes}")
        landing = self.land(header, transport, replay)
        try:
            view, offset = memoryview(payload).cast("B"), 0
            for part in landing.parts:
                part[:] = view[offset : offset + len(part)]
                offset += len(part)
        except Exception:
            self.abandon(landing)
            raise
        return self.landed(landing)

    def _check_compatible(self, header: KVChunkHeader) -> None:
        layout = self._layout
        if header.layout != layout.signature or header.dtype != layout.dtype_name:
            raise ChunkError(
                f"KV layout {header.layout}/{header.dtype} does not match this engine's {layout.signature}/{layout.dtype_name}"
            )
        if header.block_bytes != layout.block_bytes or header.layer >= len(self._layers):
            raise ChunkError("chunk block size or layer index does not match this engine")

    def _reserve_staging(self, header: KVChunkHeader, transport: str) -> ChunkLanding:
        # Caller holds the lock.
        if header.transfer_id in self._closed:
            raise TransferNotWanted(f"transfer {header.transfer_id} is already closed")
        if self._staged_bytes + header.payload_bytes > self._settings.max_staged_bytes:
            raise StagingFull("KV staging buffer is full")
        self._staged_bytes += header.payload_bytes
        buffer = bytearray(header.payload_bytes)
        return ChunkLanding(header, [memoryview(buffer)], None, buffer, False, transport)

    def _close(self, transfer_id: str, completed: bool = False) -> None:
        self._closed[transfer_id] = completed
        while len(self._closed) > _CLOSED_IDS_KEPT:
            self._closed.popitem(last=False)

    def _expire_staged(self, now: float) -> None:
        for transfer_id, staged in list(self._staged.items()):
            if now - staged.created > self._settings.staged_ttl_s:
                logger.warning("dropping staged KV of %s: its request never arrived", transfer_id)
                del self._staged[transfer_id]
                self._staged_bytes -= staged.nbytes
                self._close(transfer_id)
                self._stats.add(expired_leases=1)
