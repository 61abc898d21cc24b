"""Consumer side of the NIXL data path. It tells a producer where to write a transfer
(`NixlTarget`: the blocks vLLM reserved for the request, and this agent's metadata), reads
the notices of the writes that landed while any may still land, and hears when a
producer's writes have ended (`NixlWritten`). Every landed write is checked against its
notice's checksum before its blocks count as received, on the transfer table the chunked
paths share."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from pdcluster.kv_transfer.chunk_header import ChunkError
from pdcluster.kv_transfer.incoming_transfers import ExpectedTransfer, IncomingTransfers, TransferNotWanted
from pdcluster.kv_transfer.nixl_agent import NixlAgent
from pdcluster.kv_transfer.nixl_write_notice import NixlWriteNotice
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.transfer_stats import TransferStats
from pdcluster.protos import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)

# Reading notices also progresses the writes landing here (UCX over TCP needs it).
NOTICE_POLL_S = 0.0005
TARGET_POLL_S = 0.002
MAX_TARGET_WAIT_S = 2.0
# Beyond the producer's lease: its clock started before ours, plus a write's last bytes.
HOLD_MARGIN_S = 2.0


class NixlConsumer:
    def __init__(
        self,
        agent: NixlAgent,
        transfers: IncomingTransfers,
        layers: Sequence[torch.Tensor],
        stats: TransferStats,
        settings: KVEndpointSettings,
    ) -> None:
        self._agent = agent
        self._settings = settings
        self._transfers = transfers
        self._layers = list(layers)
        self._stats = stats
        self._spans = [pb.LayerSpan(**asdict(span)) for span in agent.spans]
        self._reader: asyncio.Task | None = None

    async def target(self, request: pb.NixlTargetRequest) -> pb.NixlTargetReply:
        """Raises ChunkError for a producer whose KV layout or engine differs, TransferNotWanted
        for a transfer that ended here."""
        self._settings.check_compatibility(request.compatibility)
        layout = self._agent.layout
        if request.layout != layout.signature or request.dtype != layout.dtype_name:
            raise ChunkError(
                f"KV layout {request.layout}/{request.dtype} does not match this engine's {layout.signature}/{layout.dtype_name}"
            )
        hold_s = request.lease_ms / 1000 + HOLD_MARGIN_S
        give_up = time.monotonic() + min(request.wait_ms / 1000, MAX_TARGET_WAIT_S)
        while (t := self.allow_writer(request.transfer_id, request.producer_agent, hold_s)) is None:
            if time.monotonic() >= give_up:
                return pb.NixlTargetReply(status=pb.NixlTargetReply.NOT_SCHEDULED)
            await asyncio.sleep(TARGET_POLL_S)
        if t.complete:
            return pb.NixlTargetReply(status=pb.NixlTargetReply.COMPLETE)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_notices())
        return pb.NixlTargetReply(
            status=pb.NixlTargetReply.READY,
            agent=self._agent.name,
            agent_metadata=b"" if request.known_agent == self._agent.name else self._agent.metadata,
            memory=self._agent.memory,
            layers=self._spans,
            block_ids=t.block_ids,
            first_block=t.first_block,
        )

    def written(self, request: pb.NixlWrittenRequest) -> pb.PushAck:
        complete = self.writes_ended(request.transfer_id, request.producer_agent)
        return pb.PushAck(transfer_id=request.transfer_id, complete=complete)

    def allow_writer(self, transfer_id: str, writer: str, hold_s: float) -> ExpectedTransfer | None:
        """Let `writer` (a producer's NIXL agent) write this transfer's blocks; they stay held
        `hold_s` unless it reports its writes ended. None while the request is not scheduled.
        A complete transfer is returned as it is and written no more: a producer asks again
        only once its earlier writes ended, so its hold ends here."""
        with self._transfers.lock:
            t = self._transfers.get(transfer_id)
            if t is None:
                if self._transfers.closed(transfer_id) is not None:
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
            self._transfers.progress.set()
        return t

    def landed(self, writer: str, message: bytes) -> None:
        """A write's notice: check the written blocks against its checksum and count them
        received, or fail the transfer so it is recomputed, never decoded."""
        try:
            notice = NixlWriteNotice.decode(message)
        except ChunkError as e:
            logger.warning("ignoring a NIXL notification from %s: %s", writer, e)
            return
        start, end = notice.block_start, notice.block_end
        with self._transfers.lock:
            t = self._transfers.get(notice.transfer_id)
            if t is None or t.nixl_writer != writer or t.failure:
                return  # ended meanwhile, or not this agent's to write
            if notice.layer >= len(self._layers) or start < t.first_block or end > len(t.block_ids):
                t.failure = f"NIXL write notice names blocks outside the transfer ({notice})"
                self._transfers.progress.set()
                return
            t.writers += 1
        layout = self._agent.layout
        matches = False
        try:
            matches = layout.checksum(self._layers[notice.layer], t.block_ids[start:end]) == notice.checksum
        finally:
            with self._transfers.lock:
                t.writers -= 1
                if matches:
                    t.received[notice.layer, start:end] = True
                else:
                    t.failure = t.failure or f"KV checksum mismatch after a NIXL write (layer {notice.layer} blocks {start}:{end})"
                complete = t.complete
        if matches:
            self._stats.moved("nixl", received=(end - start) * layout.block_bytes)
        else:
            self._stats.add(checksum_failures=1)
        if complete or not matches:
            self._transfers.progress.set()

    def writes_ended(self, transfer_id: str, writer: str) -> bool:
        """The producer's writes of this transfer have all ended: release the hold. Returns
        whether every block arrived intact; raises TransferNotWanted with why not."""
        with self._transfers.lock:
            t = self._transfers.get(transfer_id)
            if t is None and self._transfers.closed(transfer_id):
                return True  # complete, and already handed to vLLM
            if t is None or t.nixl_writer != writer:
                raise TransferNotWanted(f"transfer {transfer_id} is not awaited from this producer")
            t.hold_until = 0.0
            if t.failure:
                raise TransferNotWanted(f"transfer {transfer_id} failed: {t.failure}")
            complete = t.complete
        self._transfers.progress.set()  # a complete transfer is vLLM's now
        return complete

    async def _read_notices(self) -> None:
        # Only while writes may land: an idle consumer polls nothing.
        while self._transfers.nixl_active():
            for writer, notices in self._agent.notifications().items():
                for notice in notices:
                    self.landed(writer, notice)
            await asyncio.sleep(NOTICE_POLL_S)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
