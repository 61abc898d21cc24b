"""Counters of one KV endpoint: bytes and seconds of every transfer, both directions."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class TransferStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    send_seconds: float = 0.0
    receive_seconds: float = 0.0
    transfers_sent: int = 0
    transfers_received: int = 0
    transfers_failed: int = 0
    checksum_failures: int = 0
    send_retries: int = 0
    recomputes: int = 0
    expired_leases: int = 0
    tier_blocks_stored: int = 0  # copied into the host KV tier
    tier_blocks_loaded: int = 0  # copied back instead of recomputed
    tier_checksum_failures: int = 0  # tier blocks that failed their checksum (recomputed)
    # By data path ("tcp", "grpc", "nixl"): what each transfer actually used.
    bytes_sent_by_transport: Counter = field(default_factory=Counter)
    bytes_received_by_transport: Counter = field(default_factory=Counter)
    transfers_by_transport: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def moved(self, transport: str, *, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
            self.bytes_sent_by_transport[transport] += sent
            self.bytes_received_by_transport[transport] += received

    def transfer_done(self, transport: str, **deltas: float) -> None:
        """A transfer ended well: count it under its data path, with its other counters."""
        with self._lock:
            self.transfers_by_transport[transport] += 1
        self.add(**deltas)

    def snapshot(self) -> dict:
        with self._lock:
            return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v for f in fields(self)}
