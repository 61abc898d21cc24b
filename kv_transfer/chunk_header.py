"""The msgpack header that precedes each chunk of raw KV bytes on the wire.

A chunk carries the KV of one layer for a contiguous range of a request's prompt tokens,
for every block the range touches, in the engine's own per-block layout. Decoders bound
every size and check every field before anything is written into a KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import msgpack
import xxhash

MAX_HEADER_BYTES = 4096
MAX_ID_CHARS = 256
MAX_LAYERS = 4096
MAX_TOKENS = 1 << 24
MAX_PAYLOAD_BYTES = 1 << 30
DTYPES = frozenset({"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "uint8"})


class ChunkError(ValueError):
    """A chunk is malformed or corrupted; it must not be written anywhere."""


def payload_checksum(payload: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload)


@dataclass(frozen=True)
class KVChunkHeader:
    transfer_id: str
    layer: int  # index into the engine's ordered list of attention layers
    token_start: int  # first prompt token of the range
    num_tokens: int
    dtype: str
    token_bytes: int  # bytes one token takes in one layer: sizes the payload
    layout: str  # the per-block layout, e.g. "LBHNC:2x128x64"; must match the consumer's
    payload_bytes: int
    checksum: int
    auth_token: str = ""

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "KVChunkHeader":
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
        for name in ("transfer_id", "dtype", "layout", "auth_token"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
                raise ChunkError(f"chunk header field {name!r} is not a short string")
        for name in ("layer", "token_start", "num_tokens", "token_bytes", "payload_bytes", "checksum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ChunkError(f"chunk header field {name!r} is not a non-negative integer")
        if not self.transfer_id:
            raise ChunkError("chunk header has an empty transfer_id")
        if self.dtype not in DTYPES:
            raise ChunkError(f"unsupported KV dtype {self.dtype!r}")
        if self.layer >= MAX_LAYERS or self.token_start + self.num_tokens > MAX_TOKENS:
            raise ChunkError("chunk header layer or token range out of bounds")
        if self.num_tokens == 0 or self.payload_bytes > MAX_PAYLOAD_BYTES:
            raise ChunkError("chunk header has no tokens or an oversized payload")
        if self.payload_bytes != self.num_tokens * self.token_bytes:
            raise ChunkError("chunk payload size does not match its token count")

    def check_payload(self, payload: bytes | memoryview) -> None:
        if len(payload) != self.payload_bytes:
            raise ChunkError(
                f"chunk payload is {len(payload)} bytes, header says {self.payload_bytes}"
            )
        if payload_checksum(payload) != self.checksum:
            raise ChunkError(
                f"checksum mismatch in transfer {self.transfer_id} layer {self.layer} "
                f"tokens {self.token_start}+{self.num_tokens}"
            )


_FIELDS = frozenset(KVChunkHeader.__dataclass_fields__)
