"""Zero-copy encoding of the `KVChunk` protobuf message.

The generated protobuf class copies the payload on parse and accepts only `bytes` on
build; for multi-megabyte KV chunks we write and read the same wire format directly
(field 1 = header bytes, field 2 = payload bytes), so a received payload is a view into
the buffer gRPC handed us. Interoperable with any client generated from kv_transfer.proto.
"""

from __future__ import annotations

from pdcluster.kv_transfer.chunk_header import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, ChunkError

_HEADER_TAG = 0x0A  # field 1, length-delimited
_PAYLOAD_TAG = 0x12  # field 2, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ChunkError("truncated or oversized varint in KVChunk")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def encode_kv_chunk(header: bytes, parts) -> bytes:
    """One KVChunk message; the payload is the concatenation of `parts` (buffers)."""
    body = [memoryview(p).cast("B") for p in parts]
    size = sum(len(b) for b in body)
    return b"".join((bytes((_HEADER_TAG,)), _varint(len(header)), header, bytes((_PAYLOAD_TAG,)), _varint(size), *body))


def decode_kv_chunk(data: bytes) -> tuple[bytes, memoryview]:
    """(header bytes, payload view) of one KVChunk message; unknown fields are refused."""
    view = memoryview(data)
    header, payload = b"", view[0:0]
    pos = 0
    while pos < len(view):
        tag, pos = _read_varint(view, pos)
        if tag not in (_HEADER_TAG, _PAYLOAD_TAG):
            raise ChunkError(f"unexpected field tag {tag} in KVChunk")
        length, pos = _read_varint(view, pos)
        limit = MAX_HEADER_BYTES if tag == _HEADER_TAG else MAX_PAYLOAD_BYTES
        if length > limit or pos + length > len(view):
            raise ChunkError("KVChunk field length out of bounds")
        if tag == _HEADER_TAG:
            header = bytes(view[pos : pos + length])
        else:
            payload = view[pos : pos + length]
        pos += length
    return header, payload
