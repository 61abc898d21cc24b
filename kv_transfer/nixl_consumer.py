"""Consumer side of the NIXL data path. It tells a producer where to write a transfer
(`NixlTarget`: the blocks vLLM reserved for the request, and this agent's metadata), reads
the notices of the writes that landed while any may still land, and hears when a
producer's writes have ended (`NixlWritten`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from pdcluster.kv_transfer.chunk_header import ChunkError
from pdcluster.kv_transfer.kv_receiver import KVReceiver
from pdcluster.kv_transfer.nixl_agent import NixlAgent
from pdcluster.protos import kv_transfer_pb2 as pb

# Reading notices also progresses the writes landing here (UCX over TCP needs it).
NOTICE_POLL_S = 0.0005
TARGET_POLL_S = 0.002
MAX_TARGET_WAIT_S = 2.0
# Beyond the producer's lease: its clock started before ours, plus a write's last bytes.
HOLD_MARGIN_S = 2.0


class NixlConsumer:
    def __init__(self, agent: NixlAgent, receiver: KVReceiver) -> None:
        self._agent = agent
        self._receiver = receiver
        self._spans = [pb.LayerSpan(**asdict(span)) for span in agent.spans]
        self._reader: asyncio.Task | None = None

    async def target(self, request: pb.NixlTargetRequest) -> pb.NixlTargetReply:
        """Raises ChunkError for a producer whose KV layout differs, TransferNotWanted for a
        transfer that ended here."""
        layout = self._agent.layout
        if request.layout != layout.signature or request.dtype != layout.dtype_name:
            raise ChunkError(
                f"KV layout {request.layout}/{request.dtype} does not match this engine's {layout.signature}/{layout.dtype_name}"
            )
        hold_s = request.lease_ms / 1000 + HOLD_MARGIN_S
        give_up = time.monotonic() + min(request.wait_ms / 1000, MAX_TARGET_WAIT_S)
        while (t := self._receiver.nixl_target(request.transfer_id, request.producer_agent, hold_s)) is None:
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
        complete = self._receiver.nixl_written(request.transfer_id, request.producer_agent)
        return pb.PushAck(transfer_id=request.transfer_id, complete=complete)

    async def _read_notices(self) -> None:
        # Only while writes may land: an idle consumer polls nothing.
        while self._receiver.nixl_active():
            for writer, notices in self._agent.notifications().items():
                for notice in notices:
                    self._receiver.nixl_landed(writer, notice)
            await asyncio.sleep(NOTICE_POLL_S)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
