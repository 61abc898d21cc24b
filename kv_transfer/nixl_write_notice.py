"""The notification a producer attaches to each NIXL WRITE: which blocks of which layer
of which transfer just landed, and their checksum. NIXL delivers it only after the write's
data, so the consumer checks the blocks when it reads the notice. One-sided writes carry
no per-chunk check of their own; this is the end-to-end one."""

from __future__ import annotations

from dataclasses import astuple, dataclass

import msgpack

from pdcluster.kv_transfer.chunk_header import MAX_ID_CHARS, ChunkError

MAX_NOTICE_BYTES = 1024


@dataclass(frozen=True)
class NixlWriteNotice:
    transfer_id: str
    layer: int
    block_start: int  # indexes into the request's block list, as in KVChunkHeader
    block_end: int
    checksum: int  # xxh3-64 of the blocks' bytes (PagedKVLayout.checksum)

    def encode(self) -> bytes:
        return msgpack.packb(astuple(self))

    @classmethod
    def decode(cls, data: bytes) -> NixlWriteNotice:
        if len(data) > MAX_NOTICE_BYTES:
            raise ChunkError("NIXL write notice too large")
        try:
            fields = msgpack.unpackb(data, raw=False, max_bin_len=0)
            notice = cls(*fields)
        except Exception as e:  # msgpack raises several types; a wrong arity is a TypeError
            raise ChunkError(f"undecodable NIXL write notice: {e}") from None
        if not isinstance(notice.transfer_id, str) or not notice.transfer_id or len(notice.transfer_id) > MAX_ID_CHARS:
            raise ChunkError("NIXL write notice has a bad transfer id")
        numbers = (notice.layer, notice.block_start, notice.block_end, notice.checksum)
        if not all(isinstance(n, int) and n >= 0 for n in numbers) or notice.block_start >= notice.block_end:
            raise ChunkError("NIXL write notice has a bad block range")
        return notice
