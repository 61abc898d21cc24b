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

import numpy as np
import torch

from pdcluster.kv_transfer.chunk_header import ChunkChecksumError, ChunkError, KVChunkHeader, payload_checksum
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout
from pdcluster.kv_transfer.settings import KVTransferSettings
from pdcluster.kv_transfer.transfer_stats import TransferStats

logger = logging.getLogger(__name__)

_CLOSED_IDS_KEPT = 10_000


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

    @property
    def complete(self) -> bool:
        return bool(self.received.all())

    @property
    def awaited(self) -> bool:
        return not self.failure and not self.complete


@dataclass
class ChunkLanding:
    """Where one chunk's payload is received; `parts` cover it, in order."""

    header: KVChunkHeader
    parts: list[memoryview]
    transfer: ExpectedTransfer | None  # None: staged, its request is not scheduled yet
    buffer: bytearray | None  # staging buffer, or the bytes to unpack from
    replay: bool  # a staged chunk written at last: its bytes were counted on arrival


@dataclass
class StagedTransfer:
    chunks: list[tuple[KVChunkHeader, bytearray]] = field(default_factory=list)
    nbytes: int = 0
    created: float = field(default_factory=time.monotonic)


class KVReceiver:
    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        layout: PagedKVLayout,
        settings: KVTransferSettings,
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
        self._closed: OrderedDict[str, None] = OrderedDict()

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
                self._deliver(header, payload, replay=True)
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
                if t.writers or t.awaited:
                    continue
                del self._expected[transfer_id]
                self._by_request.pop(t.request_id, None)
                self._close(transfer_id)
                finished.add(t.request_id)
                if t.complete and not t.failure:
                    self._stats.add(transfers_received=1, receive_seconds=time.monotonic() - t.started)
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

    def on_chunk(self, header: KVChunkHeader, payload: bytes | memoryview) -> bool:
        """Take one chunk already in memory. Returns whether its transfer is now complete.

        Raises ChunkError for a corrupted chunk (the producer may resend) or a mismatched
        one (the transfer fails), TransferNotWanted / StagingFull when it is refused.
        """
        return self._deliver(header, payload, replay=False)

    def land(self, header: KVChunkHeader, replay: bool = False) -> ChunkLanding:
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
                return self._reserve_staging(header)
            if t.failure:
                raise TransferNotWanted(f"transfer {t.transfer_id} failed: {t.failure}")
            if end > len(t.block_ids):
                t.failure = f"chunk blocks {start}:{end} beyond the request's {len(t.block_ids)}"
                raise ChunkError(t.failure)
            t.writers += 1
        views = list(self._layout.views(self._layers[header.layer], t.block_ids[start:end]))
        if not all(v.is_contiguous() for v in views):
            buffer = bytearray(header.payload_bytes)
            return ChunkLanding(header, [memoryview(buffer)], t, buffer, replay)
        # Blocks below first_block are shared prefix-cache blocks: land those in scratch.
        parts = [
            memoryview(bytearray(header.block_bytes)) if i < t.first_block else memoryview(v.view(-1).view(torch.uint8).numpy())
            for i, v in zip(range(start, end), views)
        ]
        return ChunkLanding(header, parts, t, None, replay)

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
            self._stats.add(bytes_received=header.payload_bytes)
        if t is None:
            with self._lock:
                if header.transfer_id not in self._expected:
                    staged = self._staged.setdefault(header.transfer_id, StagedTransfer())
                    staged.chunks.append((header, landing.buffer))
                    staged.nbytes += header.payload_bytes
                    return False
                # Its request was scheduled while this chunk was arriving: write it now,
                # or it would sit in staging that expect() has already drained.
                self._staged_bytes -= header.payload_bytes
            return self._deliver(header, landing.buffer, replay=True)
        start, end = header.block_start, header.block_start + header.num_blocks
        if landing.buffer is not None:  # a layout that needs unpacking
            lo = max(start, t.first_block)
            skip = (lo - start) * header.block_bytes
            if lo < end:
                self._layout.unpack(memoryview(landing.buffer)[skip:], self._layers[header.layer], t.block_ids[lo:end])
        with self._lock:
            t.writers -= 1
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
        """KV endpoints of the producers whose transfers are still awaited."""
        with self._lock:
            return {t.producer for t in self._expected.values() if t.producer and t.awaited}

    def fail_from(self, producer: str, reason: str) -> int:
        """Fail every transfer still awaited from `producer`; returns how many."""
        with self._lock:
            waiting = [t for t in self._expected.values() if t.producer == producer and t.awaited]
            for t in waiting:
                t.failure = reason
        if waiting:
            self._progress.set()
        return len(waiting)

    def fail(self, transfer_id: str, reason: str) -> bool:
        with self._lock:
            transfer = self._expected.get(transfer_id)
            if transfer is None:
                staged = self._staged.pop(transfer_id, None)
                if staged:
                    self._staged_bytes -= staged.nbytes
                self._close(transfer_id)
                return staged is not None
            transfer.failure = transfer.failure or reason
        self._progress.set()
        return True

    # -- internals --------------------------------------------------------------------

    def _deliver(self, header: KVChunkHeader, payload: bytes | memoryview, replay: bool) -> bool:
        if len(payload) != header.payload_bytes:
            raise ChunkError(f"chunk payload is {len(payload)} bytes, header says {header.payload_bytes}")
        landing = self.land(header, replay)
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

    def _reserve_staging(self, header: KVChunkHeader) -> ChunkLanding:
        # Caller holds the lock.
        if header.transfer_id in self._closed:
            raise TransferNotWanted(f"transfer {header.transfer_id} is already closed")
        if self._staged_bytes + header.payload_bytes > self._settings.max_staged_bytes:
            raise StagingFull("KV staging buffer is full")
        self._staged_bytes += header.payload_bytes
        buffer = bytearray(header.payload_bytes)
        return ChunkLanding(header, [memoryview(buffer)], None, buffer, False)

    def _close(self, transfer_id: str) -> None:
        self._closed[transfer_id] = None
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
