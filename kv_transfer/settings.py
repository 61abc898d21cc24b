"""Typed settings of the KV connector, read from vLLM's `kv_connector_extra_config`."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, fields
from typing import Any

from pdcluster.common.tls import TLSFiles

TRANSPORTS = ("auto", "tcp", "grpc", "nixl")


@dataclass(frozen=True)
class KVTransferSettings:
    # Where this engine's KVTransfer service listens (port 0: pick a free one).
    host: str = "127.0.0.1"
    port: int = 0
    # Data path for KV: "tcp" (a raw socket negotiated over gRPC), "grpc" (streams), "nixl"
    # (one-sided writes into the consumer's blocks) or "auto" (nixl where both ends have
    # it and can reach each other, else tcp).
    transport: str = "auto"
    data_port: int = 0  # the raw-TCP data channel's port (0: pick a free one)
    # "host:port" producers should dial for the data channel when it differs from the
    # bound one (NAT, a Kubernetes Service, a proxy). Empty: the bound address.
    data_advertise: str = ""
    # Largest payload of one chunk; a layer's block range is split to fit (at least one
    # block). Measured best here (bench/RESULTS.md): 4 MiB on tcp, 1 MiB on grpc.
    chunk_bytes: int = 4 << 20
    # Concurrent gRPC streams a producer opens to one consumer.
    streams_per_transfer: int = 2
    # Consumer: how long a registered transfer may wait for all its chunks.
    load_timeout_s: float = 60.0
    # Consumer: a producer silent this long (no answer to a ping) fails its awaited transfers.
    producer_lost_after_s: float = 5.0
    # Producer: how long blocks stay held for a consumer that never confirms.
    send_timeout_s: float = 60.0
    send_retries: int = 2
    # Consumer: chunks that arrive before their request is scheduled are staged.
    max_staged_bytes: int = 2 << 30
    staged_ttl_s: float = 60.0
    # Shared secret of the cluster; chunks without it are rejected. Empty: no check.
    auth_token: str = ""
    # Where the connector writes the endpoint it bound, for the hosting worker to read.
    endpoint_file: str = ""
    # TLS (see kv_transfer/tls.py) on the KVTransfer service and the data channel.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> KVTransferSettings:
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys: {unknown}")
        values = {}
        for name, value in extra.items():
            kind = type(getattr(cls(), name))
            values[name] = kind(value)
        settings = cls(**values)
        if settings.chunk_bytes <= 0 or settings.streams_per_transfer <= 0:
            raise ValueError("chunk_bytes and streams_per_transfer must be positive")
        if settings.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {settings.transport!r}")
        return settings

    def check_token(self, token: str) -> None:
        """Refuse a peer that does not present the cluster's shared token."""
        if self.auth_token and not hmac.compare_digest(token.encode(), self.auth_token.encode()):
            raise PermissionError("KV transfer peer did not present the cluster token")
