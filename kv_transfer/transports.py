"""How a producer's KV reaches a consumer: the `Transport` protocol, and the one place that
turns the configured `transport` into the data paths a transfer tries, in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from pdcluster.kv_transfer.chunk_stream_transport import ChunkStreamTransport
from pdcluster.kv_transfer.kv_transfer_service import KVClient
from pdcluster.kv_transfer.nixl_producer import NixlProducer
from pdcluster.kv_transfer.outgoing_transfer import OutgoingTransfer
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout
from pdcluster.kv_transfer.settings import KVEndpointSettings


class Transport(Protocol):
    name: str  # "tcp", "grpc" or "nixl": what the transfer stats count its bytes under

    async def send(self, t: OutgoingTransfer) -> int | None:
        """Move every block of `t` as it is announced; returns the bytes moved, or None when
        this path cannot carry `t` and the next should. Raises TransferFailed."""
        ...


def transports_for(
    settings: KVEndpointSettings,
    client: KVClient,
    layers: Sequence[torch.Tensor],
    layout: PagedKVLayout,
    nixl: NixlProducer | None,
) -> list[Transport]:
    """`nixl`: NIXL only (the endpoint refuses to start without it). `auto`: NIXL where this
    engine has it and the consumer takes its writes, else the raw-TCP data channel. `tcp`,
    `grpc`: that chunked path only."""
    if settings.transport == "grpc":
        return [ChunkStreamTransport("grpc", client, layers, layout, settings)]
    if settings.transport == "nixl":
        if nixl is None:
            raise ValueError("kv transport nixl needs this engine's NIXL agent")
        return [nixl]
    tcp = ChunkStreamTransport("tcp", client, layers, layout, settings)
    return [nixl, tcp] if settings.transport == "auto" and nixl is not None else [tcp]
