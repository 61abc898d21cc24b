"""gRPC channel/server options for bulk KV streams (measured with `pdcluster bench transfer`)."""

from __future__ import annotations


def bulk_channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    limit = max_message_bytes + (1 << 20)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Large HTTP/2 frames and windows: fewer frames and window updates per chunk.
        ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
        ("grpc.http2.bdp_probe", 1),
        ("grpc.http2.write_buffer_size", 8 * 1024 * 1024),
        # Separate TCP connections per channel instead of one shared subchannel.
        ("grpc.use_local_subchannel_pool", 1),
    ]
