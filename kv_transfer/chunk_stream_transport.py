"""The chunked data paths: a transfer's announced block ranges read out of the paged cache
as checksummed chunks, on several parallel streams to the consumer, over its raw-TCP data
channel (`tcp`) or as gRPC client streams (`grpc`). Blocks the consumer says it holds in its
prefix cache (a conversation's earlier turns, on the decode worker that served them) are not
sent. Where the router believes it holds a prefix, the streams wait for its answer (as a NIXL
writer waits for its target; every block goes, staged there, if the request is not scheduled
there within HELD_BLOCKS_WAIT_S); elsewhere they start at once, and skip what it holds from
the moment its answer comes (a first turn loses no time waiting)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import torch

from pdcluster.kv_transfer.chunk_header import KVChunkHeader, payload_checksum
from pdcluster.kv_transfer.kv_transfer_service import KVClient, TransferFailed
from pdcluster.kv_transfer.outgoing_transfer import OutgoingTransfer
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout
from pdcluster.kv_transfer.settings import KVEndpointSettings

logger = logging.getLogger(__name__)

# How long the consumer may take to schedule the request before it answers "none held".
HELD_BLOCKS_WAIT_S = 0.5


class ChunkStreamTransport:
    def __init__(
        self, name: str, client: KVClient, layers: Sequence[torch.Tensor], layout: PagedKVLayout, settings: KVEndpointSettings
    ) -> None:
        self.name = name
        self._client = client
        self._push = {"tcp": client.push_over_data_channel, "grpc": client.push_over_grpc}[name]
        self._layers = list(layers)
        self._layout = layout
        self._settings = settings

    async def send(self, t: OutgoingTransfer) -> int:
        """Streams every range of `t` as it is announced; returns the bytes moved. Raises
        TransferFailed, retryable only if every stream failed in a way a retry can fix."""
        sent: list[int] = []  # blocks of each chunk, every stream's
        learn = asyncio.create_task(self._learn_held_blocks(t))
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self._settings.streams_per_transfer):
                    group.create_task(self._push(t.endpoint, self._chunks(t, sent, learn), t.deadline - time.monotonic()))
        except ExceptionGroup as group:
            failed, other = group.split(TransferFailed)
            if other is not None:
                raise other
            errors = [e for e in failed.exceptions if isinstance(e, TransferFailed)]  # split() kept only these
            raise TransferFailed(str(errors[0]), all(e.retryable for e in errors)) from None
        finally:
            learn.cancel()
        return sum(sent) * self._layout.block_bytes

    async def _learn_held_blocks(self, t: OutgoingTransfer) -> None:
        try:
            t.first_block = await self._client.held_blocks(t.endpoint, t.transfer_id, HELD_BLOCKS_WAIT_S)
        except TransferFailed as e:  # sending every block is still right
            logger.debug("transfer %s sends every block: %s", t.transfer_id, e)

    async def _chunks(self, t: OutgoingTransfer, sent: list[int], learn: asyncio.Task):
        # One pack buffer per stream (for layouts that need packing): a chunk is handed
        # over before the next is packed.
        step = max(1, self._settings.chunk_bytes // self._layout.block_bytes)
        buffer = torch.empty(step * self._layout.block_bytes, dtype=torch.uint8)
        if t.ask_first:
            await asyncio.wait([learn])  # every stream waits; none cancels it
        while (taken := await t.next_range()) is not None:
            layer, start, end = taken
            start = max(start, t.first_block)
            if start < end:
                sent.append(end - start)
                yield self._encode(t, layer, start, end, buffer)

    def _encode(self, t: OutgoingTransfer, layer: int, start: int, end: int, buffer: torch.Tensor) -> tuple[bytes, list[memoryview]]:
        parts = self._layout.payload_parts(self._layers[layer], t.block_ids[start:end], into=buffer)
        header = KVChunkHeader(
            transfer_id=t.transfer_id,
            layer=layer,
            block_start=start,
            num_blocks=end - start,
            dtype=self._layout.dtype_name,
            block_bytes=self._layout.block_bytes,
            layout=self._layout.signature,
            payload_bytes=sum(p.nbytes for p in parts),
            checksum=payload_checksum(*parts),
            auth_token=self._settings.auth_token,
            compatibility=self._settings.compatibility,
        )
        return header.encode(), parts
