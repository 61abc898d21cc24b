"""Counters of one KV endpoint: bytes and seconds of every transfer, both directions."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


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

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self)}
