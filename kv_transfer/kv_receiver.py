"""Consumer side of the chunked data paths (raw TCP, gRPC streams): writes arriving chunks
into the blocks vLLM allocated, checked, and stages the ones that come before their request
is scheduled. Also the connector's view of every incoming transfer: `expect` when vLLM
allocates a request's blocks, `poll` for the loads that ended (whatever path carried them;
NIXL writes land through `NixlConsumer`, on the same table)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pdcluster.kv_transfer.chunk_header import ChunkChecksumError, ChunkError, KVChunkHeader, payload_checksum
from pdcluster.kv_transfer.incoming_transfers import ExpectedTransfer, IncomingTransfers, TransferNotWanted
from pdcluster.kv_transfer.kv_staging import KVStaging
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout, tensor_bytes
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.transfer_stats import TransferStats


@dataclass
class ChunkLanding:
    """Where one chunk's payload is received; `parts` cover it, in order."""

    header: KVChunkHeader
    parts: list[memoryview]
    transfer: ExpectedTransfer | None  # None: staged, its request is not scheduled yet
    buffer: bytearray | None  # staging buffer, or the bytes to unpack from
    replay: bool  # a staged chunk written at last: its bytes were counted on arrival
    transport: str


class KVReceiver:
    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        layout: PagedKVLayout,
        settings: KVEndpointSettings,
        stats: TransferStats,
        progress: threading.Event | None = None,
    ) -> None:
        self._layers = list(layers)
        self._layout = layout
        self._settings = settings
        self._stats = stats
        # Set when a transfer completes or fails.
        self.transfers = IncomingTransfers(len(self._layers), settings.load_timeout_s, stats, progress or threading.Event())
        self._staging = KVStaging(settings.max_staged_bytes, settings.staged_ttl_s)

    # -- called by the engine thread --------------------------------------------------

    def expect(
        self,
        transfer_id: str,
        request_id: str,
        block_ids: list[int],
        first_block: int,
        producer: str = "",
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """vLLM allocated the request's blocks: its KV may land now (staged chunks first).
        `trace`: its request's W3C trace headers."""
        with self.transfers.lock:
            self.transfers.add(transfer_id, request_id, block_ids, first_block, producer, trace)
            staged = self._staging.take(transfer_id)
        for header, payload in staged.chunks if staged else ():
            try:
                self._deliver(header, payload, staged.transport, replay=True)
            except (ChunkError, TransferNotWanted) as e:
                self.fail(transfer_id, str(e))
                break

    def cancel_request(self, request_id: str) -> bool:
        """The consumer's own request ended (aborted); stop taking its chunks."""
        return self.transfers.cancel_request(request_id)

    def poll(self) -> tuple[set[str], set[str]]:
        """Request ids whose loads ended since the last poll: (finished, failed). A failed
        one's blocks are released only once no write into them is in flight."""
        finished, failed = self.transfers.sweep()
        with self.transfers.lock:
            for transfer_id in self._staging.expired(time.monotonic()):
                self.transfers.close(transfer_id)
                self._stats.add(expired_leases=1)
        return finished, failed

    @property
    def pending(self) -> int:
        return self.transfers.pending

    @property
    def staged_bytes(self) -> int:
        with self.transfers.lock:
            return self._staging.nbytes

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
        with self.transfers.lock:
            t = self.transfers.get(header.transfer_id)
            if t is None:
                if self.transfers.closed(header.transfer_id) is not None:
                    raise TransferNotWanted(f"transfer {header.transfer_id} is already closed")
                self._staging.reserve(header.payload_bytes)
                buffer = bytearray(header.payload_bytes)
                return ChunkLanding(header, [memoryview(buffer)], None, buffer, False, transport)
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
            with self.transfers.lock:
                if self.transfers.get(header.transfer_id) is None:
                    self._staging.keep(header, landing.buffer, landing.transport)
                    return False
                # Its request was scheduled while this chunk was arriving: write it now,
                # or it would sit in staging that expect() has already drained.
                self._staging.unreserve(header.payload_bytes)
            return self._deliver(header, landing.buffer, landing.transport, replay=True)
        start, end = header.block_start, header.block_start + header.num_blocks
        if landing.buffer is not None:  # a layout that needs unpacking
            lo = max(start, t.first_block)
            skip = (lo - start) * header.block_bytes
            if lo < end:
                self._layout.unpack(memoryview(landing.buffer)[skip:], self._layers[header.layer], t.block_ids[lo:end])
        with self.transfers.lock:
            t.writers -= 1
            t.transport = t.transport or landing.transport
            t.received[header.layer, start:end] = True
            complete = t.complete
        if complete:
            self.transfers.progress.set()
        return complete

    def abandon(self, landing: ChunkLanding) -> None:
        """A landing that will not be completed (the connection broke, or it was bad)."""
        with self.transfers.lock:
            if landing.transfer is not None:
                landing.transfer.writers -= 1
            else:
                self._staging.unreserve(landing.header.payload_bytes)

    def fail(self, transfer_id: str, reason: str, writes_stopped: bool = False) -> bool:
        """Fail a transfer, expected or staged; `writes_stopped`: its producer says no write
        of it is in flight. Returns whether it was known here."""
        with self.transfers.lock:  # one lock: an expect() in between would miss the abort
            t = self.transfers.get(transfer_id)
            if t is None:
                staged = self._staging.take(transfer_id)
                self.transfers.close(transfer_id)
                return staged is not None
            t.failure = t.failure or reason
            if writes_stopped:
                t.hold_until = 0.0
        self.transfers.progress.set()
        return True

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
        self._settings.check_compatibility(header.compatibility)
        layout = self._layout
        if header.layout != layout.signature or header.dtype != layout.dtype_name:
            raise ChunkError(
                f"KV layout {header.layout}/{header.dtype} does not match this engine's {layout.signature}/{layout.dtype_name}"
            )
        if header.block_bytes != layout.block_bytes or header.layer >= len(self._layers):
            raise ChunkError("chunk block size or layer index does not match this engine")
