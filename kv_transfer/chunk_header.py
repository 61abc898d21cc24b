"""The msgpack header that precedes each chunk of raw KV bytes on the wire.

A chunk carries the KV of one layer for a contiguous range of a request's blocks (indexes
into the request's block list, not block ids), whole blocks in the engine's own layout. Decoders bound
every size and check every field before anything is written into a KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import msgpack
import xxhash

MAX_HEADER_BYTES = 4096
MAX_ID_CHARS = 256
MAX_LAYERS = 4096
MAX_BLOCKS = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30
DTYPES = frozenset({"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "uint8"})


class ChunkError(ValueError):
    """A chunk is malformed or corrupted; it must not be written anywhere."""


class ChunkChecksumError(ChunkError):
    """A chunk's payload does not match its checksum: corrupted in flight, worth resending."""


def payload_checksum(*parts: bytes | memoryview) -> int:
    """xxh3-64 of the parts as if concatenated."""
    if len(parts) == 1:
        return xxhash.xxh3_64_intdigest(parts[0])
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return digest.intdigest()


@dataclass(frozen=True)
class KVChunkHeader:
    transfer_id: str
    layer: int  # index into the engine's ordered list of attention layers
    block_start: int  # index of the first block in the request's block list
    num_blocks: int
    dtype: str
    block_bytes: int  # bytes of one block of one layer: sizes the payload
    layout: str  # PagedKVLayout.signature; must match the consumer's
    payload_bytes: int
    checksum: int
    auth_token: str = ""
    compatibility: str = ""  # the producer engine's KV compatibility digest; must match the consumer's

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> KVChunkHeader:
        if len(data) > MAX_HEADER_BYTES:
            raise ChunkError(f"chunk header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0)
        except Exception as e:  # msgpack raises several types for bad input
            raise ChunkError(f"undecodable chunk header: {e}") from None
        if not isinstance(raw, dict) or set(raw) != _FIELDS:
            raise ChunkError("chunk header has missing or unknown fields")
        header = cls(**raw)
        header.validate()
        return header

    def validate(self) -> None:
        for name in ("transfer_id", "dtype", "layout", "auth_token", "compatibility"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
                raise ChunkError(f"chunk header field {name!r} is not a short string")
        for name in ("layer", "block_start", "num_blocks", "block_bytes", "payload_bytes", "checksum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ChunkError(f"chunk header field {name!r} is not a non-negative integer")
        if not self.transfer_id:
            raise ChunkError("chunk header has an empty transfer_id")
        if self.dtype not in DTYPES:
            raise ChunkError(f"unsupported KV dtype {self.dtype!r}")
        if self.layer >= MAX_LAYERS or self.block_start + self.num_blocks > MAX_BLOCKS:
            raise ChunkError("chunk header layer or block range out of bounds")
        if self.num_blocks == 0 or self.payload_bytes > MAX_PAYLOAD_BYTES:
            raise ChunkError("chunk header has no blocks or an oversized payload")
        if self.payload_bytes != self.num_blocks * self.block_bytes:
            raise ChunkError("chunk payload size does not match its block count")


_FIELDS = frozenset(KVChunkHeader.__dataclass_fields__)
