"""Producer side of the NIXL data path: asks the consumer where a transfer goes
(`NixlTarget`), then, as each layer's blocks are computed, WRITEs them straight from this
engine's KV blocks into the consumer's reserved ones, each write carrying a notice with
the blocks' checksum, and finally tells the consumer its writes ended (`NixlWritten`).

`auto` uses this path when both ends run NIXL and can reach each other; a consumer
without NIXL, one whose request is not scheduled within a moment, or one NIXL cannot
reach is served over TCP instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import torch

from pdcluster.common.tracing import CLIENT, ending, start_span
from pdcluster.kv_transfer.kv_transfer_service import KVClient, TransferFailed
from pdcluster.kv_transfer.nixl_agent import NixlAgent, NixlWriteFailed
from pdcluster.kv_transfer.nixl_write_notice import NixlWriteNotice
from pdcluster.kv_transfer.outgoing_transfer import OutgoingTransfer
from pdcluster.kv_transfer.paged_kv_layout import LayerSpan
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.protos import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)

WRITE_POLL_S = 0.0005
TARGET_WAIT_MS = 500
# auto: how long to wait for the consumer to schedule the request before sending over
# TCP into its staging instead (the producer's blocks stay held meanwhile).
AUTO_TARGET_WAIT_S = 2.0
# auto: how long an endpoint NIXL could not reach is served over TCP before trying again.
UNREACHABLE_RETRY_S = 60.0
# After a failed write: how long its bytes may still take to land at the consumer.
DRAIN_S = 2.0


class NixlProducer:
    """The `nixl` Transport."""

    name = "nixl"

    def __init__(self, agent: NixlAgent, client: KVClient, layers: Sequence[torch.Tensor], settings: KVEndpointSettings) -> None:
        self._agent = agent
        self._client = client
        self._layers = list(layers)
        self._settings = settings
        self._unreachable_until: dict[str, float] = {}

    async def send(self, t: OutgoingTransfer) -> int | None:
        """Writes `t` where the consumer says; None when TCP should carry it instead (`auto`:
        the consumer takes no NIXL writes, cannot be reached, or has not scheduled the request)."""
        target = await self.target(t)
        return None if target is None else await self.write(t, target)

    async def target(self, t: OutgoingTransfer) -> pb.NixlTargetReply | None:
        """Where to write `t`, or None when TCP should carry it. Raises TransferFailed."""
        with ending(start_span("kv_transfer.nixl_handshake", t.span, CLIENT, {"server.address": t.endpoint})):
            return await self._target(t)

    async def _target(self, t: OutgoingTransfer) -> pb.NixlTargetReply | None:
        auto = self._settings.transport == "auto"
        if auto and time.monotonic() < self._unreachable_until.get(t.endpoint, 0.0):
            return None
        give_up = time.monotonic() + AUTO_TARGET_WAIT_S if auto else t.deadline
        layout = self._agent.layout
        while True:
            now = time.monotonic()
            request = pb.NixlTargetRequest(
                transfer_id=t.transfer_id,
                producer_agent=self._agent.name,
                known_agent=self._agent.known_peer(t.endpoint),
                wait_ms=TARGET_WAIT_MS,
                layout=layout.signature,
                dtype=layout.dtype_name,
                lease_ms=max(int((t.deadline - now) * 1000), 1),
                compatibility=self._settings.compatibility,
            )
            reply = await self._client.nixl_target(t.endpoint, request)
            if reply.status == pb.NixlTargetReply.COMPLETE:
                return reply
            if reply.status == pb.NixlTargetReply.READY:
                t.nixl_held = True
                break
            if reply.status == pb.NixlTargetReply.NO_NIXL:
                if auto:
                    return None
                raise TransferFailed(f"the KV consumer at {t.endpoint} takes no NIXL writes (set kv_transport to auto or tcp)", False)
            if time.monotonic() >= give_up:
                return None
        if len(reply.layers) != len(self._layers) or len(reply.block_ids) != t.prompt_blocks:
            raise TransferFailed(f"the KV consumer at {t.endpoint} has another layer or block count", False)
        try:
            self._agent.use_peer(t.endpoint, reply.agent, reply.agent_metadata)
        except Exception as e:  # NIXL raises its own types for metadata it cannot load
            raise self._unreachable(t.endpoint, f"NIXL could not load the consumer's agent: {e}") from None
        return reply

    async def write(self, t: OutgoingTransfer, target: pb.NixlTargetReply) -> int:
        """Write every announced block range of `t` as it comes; returns the bytes written.
        Raises TransferFailed."""
        if target.status == pb.NixlTargetReply.COMPLETE:
            return 0  # an earlier attempt's writes all landed
        agent, layout = self._agent, self._agent.layout
        peer, dst_blocks = target.agent, list(target.block_ids)
        spans = [LayerSpan(s.base, s.block_stride, s.piece_stride, s.pieces, s.device) for s in target.layers]
        in_flight: list = []
        written = 0
        failure = ""
        try:
            while True:
                while t.cursor < len(t.ranges):
                    layer, start, end = t.ranges[t.cursor]
                    t.cursor += 1
                    # Chunks exist for the streamed paths; one write (and notice) takes a
                    # layer's whole computed range.
                    while t.cursor < len(t.ranges) and t.ranges[t.cursor][0] == layer and t.ranges[t.cursor][1] == end:
                        end = t.ranges[t.cursor][2]
                        t.cursor += 1
                    start = max(start, target.first_block)  # the consumer has those cached
                    if start >= end:
                        continue
                    blocks = t.block_ids[start:end]
                    notice = NixlWriteNotice(t.transfer_id, layer, start, end, layout.checksum(self._layers[layer], blocks))
                    src, dst = layout.regions(agent.spans[layer], blocks), layout.regions(spans[layer], dst_blocks[start:end])
                    in_flight.append(agent.write(peer, src, dst, notice.encode()))
                    written += (end - start) * layout.block_bytes
                    # Progress the writes posted so far before the next checksum: over UCX's
                    # TCP transport nothing moves between progress calls.
                    in_flight = self._progress(peer, in_flight)
                in_flight = self._progress(peer, in_flight)
                if in_flight:
                    await asyncio.sleep(WRITE_POLL_S)
                elif t.cursor >= len(t.ranges):
                    if t.announced:
                        break
                    t.changed.clear()
                    await t.changed.wait()
        except NixlWriteFailed as e:
            failure = str(e)
        finally:
            for handle in in_flight:
                agent.release(peer, handle)
        if failure:
            if written:
                # Bytes of this attempt may still sit on the wire or in the consumer's
                # buffers, landing when its NIXL progresses. Its blocks stay held (and
                # progressed) meanwhile, so they land there before a retry completes it.
                await asyncio.sleep(DRAIN_S)
            raise self._unreachable(t.endpoint, failure)
        await self.written(t)
        return written

    def _progress(self, peer: str, in_flight: list) -> list:
        """The writes still in flight (checking each progresses them); the finished released."""
        still = []
        for handle in in_flight:
            if self._agent.done(handle):
                self._agent.release(peer, handle)
            else:
                still.append(handle)
        return still

    async def written(self, t: OutgoingTransfer) -> None:
        """Tell the consumer none of our writes of `t` is in flight any more, so it may hand
        the blocks to vLLM."""
        await self._client.nixl_written(t.endpoint, pb.NixlWrittenRequest(transfer_id=t.transfer_id, producer_agent=self._agent.name))

    def _unreachable(self, endpoint: str, why: str) -> TransferFailed:
        if self._settings.transport == "auto":
            logger.warning("NIXL cannot reach the KV consumer at %s (%s): TCP carries its KV for %.0fs", endpoint, why, UNREACHABLE_RETRY_S)
            self._unreachable_until[endpoint] = time.monotonic() + UNREACHABLE_RETRY_S
        return TransferFailed(f"NIXL write to {endpoint} failed: {why}", True)
