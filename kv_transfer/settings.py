"""The KV transfer settings: one typed model, set per pool in the cluster spec (`kv:`) and on a
worker by flags (`--kv-*`), handed to the connector whole through vLLM's
`kv_connector_extra_config`."""

from __future__ import annotations

import hmac
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from pdcluster.common.tls import TLSFiles
from pdcluster.kv_transfer.chunk_header import ChunkError

Transport = Literal["auto", "tcp", "grpc", "nixl"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)


class KVTransferSettings(BaseModel):
    """What a pool's spec and a worker's flags tune."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # a typo is an error, not a default

    transport: Transport = Field(
        "auto",
        description="KV data path: NIXL one-sided writes (nixl), raw TCP negotiated over gRPC (tcp), gRPC streams (grpc), "
        "or nixl where both ends have it and reach each other, else tcp (auto)",
    )
    port: int = Field(0, description="the KVTransfer service's port (0: any free port)")
    data_port: int = Field(0, description="the raw-TCP data channel's port (0: any free port)")
    data_advertise: str = Field(
        "", description="host:port producers dial for KV data when it differs from the bound one (NAT, a Service, a proxy)"
    )
    chunk_bytes: int = Field(
        4 << 20, gt=0, description="largest payload of one chunk (at least one block); measured best: 4 MiB on tcp, 1 MiB on grpc"
    )
    streams_per_transfer: int = Field(2, gt=0, description="concurrent gRPC streams a producer opens to one consumer")
    load_timeout_s: float = Field(
        60.0, gt=0, description="consumer: how long a transfer may take to arrive whole", json_schema_extra={"flag": "--kv-load-timeout"}
    )
    producer_lost_after_s: float = Field(
        5.0, gt=0, description="consumer: a producer silent this long (no answer to a ping) fails its awaited transfers"
    )
    send_timeout_s: float = Field(
        60.0,
        gt=0,
        description="producer: how long blocks stay held for a consumer that never confirms",
        json_schema_extra={"flag": "--kv-send-timeout"},
    )
    send_retries: int = Field(2, ge=0, description="producer: resends of a transfer the consumer refused (a corrupt chunk)")
    max_staged_bytes: int = Field(2 << 30, ge=0, description="consumer: KV that arrived before its request was scheduled, at most")
    staged_ttl_s: float = Field(60.0, gt=0, description="consumer: how long staged KV waits for its request")
    tier_dir: str = Field(
        "",
        description="where the host KV tier (vLLM's --kv-offloading-size) keeps its blocks: empty for host memory "
        "(/dev/shm), or a local disk directory",
    )


class KVEndpointSettings(KVTransferSettings):
    """What the connector runs on: the pool's settings, plus what its worker fills in at start."""

    host: str = "127.0.0.1"  # where the KVTransfer service and data channel listen
    auth_token: str = ""  # the cluster's shared secret; peers without it are refused. Empty: no check
    endpoint_file: str = ""  # where the connector writes the endpoint it bound, for the worker to read
    tier_bytes: int = 0  # the host KV tier's size (vLLM's --kv-offloading-size); 0: no tier
    tls: TLSFiles = Field(default_factory=TLSFiles)  # on the KVTransfer service and the data channel
    # A digest of what a peer's KV must match (pdcluster.common.kv_compatibility), set by the
    # connector from its engine's config: KV from an engine whose digest differs is refused.
    compatibility: str = ""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> KVEndpointSettings:
        return cls.model_validate(extra or {})

    def check_compatibility(self, theirs: str) -> None:
        """Refuse KV from an engine that differs from this one in what KV depends on: the
        router pairs only matching workers, but its view can be a poll old (a worker restarted
        on another checkpoint). Without a digest of our own, no check."""
        if self.compatibility and theirs != self.compatibility:
            raise ChunkError(
                f"KV from an engine that differs from this one (compatibility {theirs or 'unstated'} != {self.compatibility}:"
                " another model, dtype, block size, TP, speculative config or version; the router's /cluster names the field)"
            )

    def check_token(self, token: str) -> None:
        """Refuse a peer that does not present the cluster's shared token."""
        if self.auth_token and not hmac.compare_digest(token.encode(), self.auth_token.encode()):
            raise PermissionError("KV transfer peer did not present the cluster token")
