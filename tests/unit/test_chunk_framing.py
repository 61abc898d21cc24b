"""KV chunk header and wire framing: round trips, bounds and corruption."""

import msgpack
import numpy as np
import pytest

from pdcluster.kv_transfer.chunk_header import MAX_HEADER_BYTES, ChunkError, KVChunkHeader, payload_checksum
from pdcluster.kv_transfer.kv_chunk_wire import decode_kv_chunk, encode_kv_chunk
from pdcluster.protos import kv_transfer_pb2 as pb


def make_header(payload: bytes, **overrides) -> KVChunkHeader:
    fields = dict(
        transfer_id="t-1",
        layer=3,
        block_start=2,
        num_blocks=len(payload) // 64,
        dtype="float32",
        block_bytes=64,
        layout="b0:2x16x64:bs16",
        payload_bytes=len(payload),
        checksum=payload_checksum(payload),
    )
    fields.update(overrides)
    return KVChunkHeader(**fields)


def test_header_round_trip():
    payload = np.arange(256, dtype=np.float32).tobytes()
    header = make_header(payload)
    assert KVChunkHeader.decode(header.encode()) == header


def test_checksum_catches_a_flipped_bit_and_spans_parts():
    payload = bytearray(np.arange(256, dtype=np.float32).tobytes())
    checksum = payload_checksum(bytes(payload))
    assert payload_checksum(bytes(payload[:100]), bytes(payload[100:])) == checksum
    payload[100] ^= 0x01
    assert payload_checksum(bytes(payload)) != checksum


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("checksum"), "missing or unknown"),
        (lambda d: d.update(extra=1), "missing or unknown"),
        (lambda d: d.update(dtype="complex128"), "unsupported KV dtype"),
        (lambda d: d.update(layer=-1), "non-negative"),
        (lambda d: d.update(layer=10**6), "out of bounds"),
        (lambda d: d.update(transfer_id=""), "empty transfer_id"),
        (lambda d: d.update(transfer_id="x" * 300), "short string"),
        (lambda d: d.update(num_blocks=3), "does not match its block count"),
        (lambda d: d.update(block_start="0"), "non-negative integer"),
    ],
)
def test_header_decoder_rejects_bad_fields(mutate, message):
    payload = bytes(256)
    raw = msgpack.unpackb(make_header(payload).encode())
    mutate(raw)
    with pytest.raises(ChunkError, match=message):
        KVChunkHeader.decode(msgpack.packb(raw))


def test_header_decoder_rejects_garbage_and_oversize():
    with pytest.raises(ChunkError):
        KVChunkHeader.decode(b"\xc1\xff\x00")
    with pytest.raises(ChunkError, match="exceeds"):
        KVChunkHeader.decode(b"\x80" * (MAX_HEADER_BYTES + 1))
    with pytest.raises(ChunkError):
        KVChunkHeader.decode(msgpack.packb([1, 2, 3]))


def test_wire_encoding_is_the_protobuf_message():
    payload = np.random.default_rng(0).integers(0, 255, 70_000, dtype=np.uint8)
    header = make_header(payload.tobytes(), num_blocks=7, payload_bytes=70_000, block_bytes=10_000)
    encoded = encode_kv_chunk(header.encode(), [payload[:30_000], payload[30_000:]])
    assert payload_checksum(payload[:30_000], payload[30_000:]) == header.checksum
    via_protobuf = pb.KVChunk(header=header.encode(), payload=payload.tobytes()).SerializeToString()
    assert encoded == via_protobuf
    raw_header, view = decode_kv_chunk(via_protobuf)
    assert raw_header == header.encode() and bytes(view) == payload.tobytes()
    assert isinstance(view, memoryview)  # no copy of the payload


@pytest.mark.parametrize("data", [b"\x0a\xff", b"\x0a\x05abc", b"\x1a\x01x", b"\x12" + b"\xff" * 11])
def test_wire_decoder_rejects_malformed_messages(data):
    with pytest.raises(ChunkError):
        decode_kv_chunk(data)
