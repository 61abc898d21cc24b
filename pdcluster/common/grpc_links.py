"""gRPC options every pdcluster channel and server share, for links that fail. A channel
retries a lost peer every two seconds at most (gRPC's own backoff grows to 120 s, so a
partition of seconds cost minutes after the link came back), and keepalive pings find a
connection whose peer vanished without a word (a stream on it would otherwise wait for TCP to
give up, many minutes later). Servers accept the pings."""

from __future__ import annotations

from collections.abc import Sequence

KEEPALIVE_MS = 10_000  # a connection silent this long is pinged, and dropped without an answer as long

_CHANNEL = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SERVER = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]


def channel_options(extra: Sequence[tuple[str, int]] = ()) -> list[tuple[str, int]]:
    return _merged(_CHANNEL, extra)


def server_options(extra: Sequence[tuple[str, int]] = ()) -> list[tuple[str, int]]:
    return _merged(_SERVER, extra)


def _merged(base: list[tuple[str, int]], extra: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    given = {name for name, _ in extra}
    return [option for option in base if option[0] not in given] + list(extra)
