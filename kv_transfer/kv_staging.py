"""Chunks that arrive before their request is scheduled: held in memory, bounded in bytes
and time, until the request's blocks exist (then `KVReceiver` writes them) or they expire.
Not locked itself: the receiver calls it under the transfer table's lock."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pdcluster.kv_transfer.chunk_header import KVChunkHeader

logger = logging.getLogger(__name__)


class StagingFull(Exception):
    """Too many bytes are staged for transfers whose requests are not scheduled yet."""


@dataclass
class StagedTransfer:
    chunks: list[tuple[KVChunkHeader, bytearray]] = field(default_factory=list)
    nbytes: int = 0
    transport: str = ""
    created: float = field(default_factory=time.monotonic)


class KVStaging:
    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self._max_bytes, self._ttl_s = max_bytes, ttl_s
        self._staged: dict[str, StagedTransfer] = {}
        self.nbytes = 0  # staged and reserved for chunks still arriving

    def reserve(self, nbytes: int) -> None:
        """Room for a chunk about to be received; raises StagingFull."""
        if self.nbytes + nbytes > self._max_bytes:
            raise StagingFull("KV staging buffer is full")
        self.nbytes += nbytes

    def unreserve(self, nbytes: int) -> None:
        self.nbytes -= nbytes

    def keep(self, header: KVChunkHeader, payload: bytearray, transport: str) -> None:
        """A received chunk (its bytes reserved) waits for its request."""
        staged = self._staged.setdefault(header.transfer_id, StagedTransfer(transport=transport))
        staged.chunks.append((header, payload))
        staged.nbytes += header.payload_bytes

    def take(self, transfer_id: str) -> StagedTransfer | None:
        staged = self._staged.pop(transfer_id, None)
        if staged is not None:
            self.nbytes -= staged.nbytes
        return staged

    def expired(self, now: float) -> list[str]:
        """Drops what waited longer than its time to live; returns those transfers' ids."""
        ids = [tid for tid, staged in self._staged.items() if now - staged.created > self._ttl_s]
        for transfer_id in ids:
            logger.warning("dropping staged KV of %s: its request never arrived", transfer_id)
            self.take(transfer_id)
        return ids
