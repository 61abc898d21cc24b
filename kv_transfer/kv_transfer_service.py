"""The `KVTransfer` gRPC service and the client that calls it.

gRPC is always the control channel (Abort, Stats, OpenDataChannel, HeldBlocks,
NixlTarget, NixlWritten). The KV itself goes on gRPC client streams of `KVChunk` messages (`grpc`; see
kv_chunk_wire for why they are encoded by hand), on the raw-TCP data channel the service
hands out (`tcp`; see tcp_transport), or as NIXL one-sided writes into the consumer's
blocks (`nixl`); transports.py chooses among them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from pdcluster.common.grpc_links import server_options
from pdcluster.common.tls import TLSFiles, add_port, open_channel
from pdcluster.kv_transfer.chunk_header import ChunkChecksumError, ChunkError, KVChunkHeader
from pdcluster.kv_transfer.grpc_options import bulk_channel_options
from pdcluster.kv_transfer.incoming_transfers import TransferNotWanted
from pdcluster.kv_transfer.kv_chunk_wire import decode_kv_chunk, encode_kv_chunk
from pdcluster.kv_transfer.kv_receiver import KVReceiver
from pdcluster.kv_transfer.kv_staging import StagingFull
from pdcluster.kv_transfer.nixl_consumer import MAX_TARGET_WAIT_S, TARGET_POLL_S, NixlConsumer
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.tcp_transport import push_over_tcp
from pdcluster.protos import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = "pdcluster.v1.KVTransfer"
PUSH = f"/{SERVICE}/Push"
ABORT = f"/{SERVICE}/Abort"
STATS = f"/{SERVICE}/Stats"
OPEN_DATA_CHANNEL = f"/{SERVICE}/OpenDataChannel"
NIXL_TARGET = f"/{SERVICE}/NixlTarget"
NIXL_WRITTEN = f"/{SERVICE}/NixlWritten"
HELD_BLOCKS = f"/{SERVICE}/HeldBlocks"

_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
_RETRYABLE_NAMES = frozenset(code.name for code in _RETRYABLE)


class TransferFailed(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def status_for(error: Exception) -> grpc.StatusCode:
    if isinstance(error, PermissionError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, TransferNotWanted):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, StagingFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, ChunkChecksumError):
        return grpc.StatusCode.DATA_LOSS
    return grpc.StatusCode.INVALID_ARGUMENT


class KVTransferService:
    """Serves one engine's KV endpoint; `receiver` is None on a producer-only engine."""

    def __init__(
        self,
        receiver: KVReceiver | None,
        stats: Callable[[], pb.KVStats],
        auth: Callable[[str], None],
        data_channel: pb.DataChannel,
        nixl: NixlConsumer | None = None,
    ) -> None:
        self._receiver = receiver
        self._stats = stats
        self._auth = auth
        self._data_channel = data_channel
        self._nixl = nixl  # None: this engine takes no NIXL writes

    async def push(self, chunks: AsyncIterator[tuple[bytes, memoryview]], context) -> pb.PushAck:
        transfer_id, complete, nbytes = "", False, 0
        async for raw_header, payload in chunks:
            try:
                header = KVChunkHeader.decode(raw_header)
                transfer_id = header.transfer_id
                if self._receiver is None:
                    raise TransferNotWanted("this engine is not a KV consumer")
                complete = self._receiver.on_chunk(header, payload, "grpc")
                nbytes += len(payload)
            except (ChunkError, PermissionError, TransferNotWanted, StagingFull) as e:
                await context.abort(status_for(e), str(e))
        return pb.PushAck(transfer_id=transfer_id, bytes_received=nbytes, complete=complete)

    async def _authorize(self, token: str, context) -> None:
        try:
            self._auth(token)
        except PermissionError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    async def abort(self, request: pb.AbortTransferRequest, context) -> pb.AbortTransferReply:
        await self._authorize(request.auth_token, context)
        # The producer aborts only once none of its writes is in flight.
        reason = f"aborted by producer: {request.reason}"
        known = bool(self._receiver and self._receiver.fail(request.transfer_id, reason, writes_stopped=True))
        return pb.AbortTransferReply(known=known)

    async def stats(self, request: pb.KVStatsRequest, context) -> pb.KVStats:
        return self._stats()

    async def open_data_channel(self, request: pb.DataChannelRequest, context) -> pb.DataChannel:
        await self._authorize(request.auth_token, context)
        return self._data_channel

    async def held_blocks(self, request: pb.HeldBlocksRequest, context) -> pb.HeldBlocksReply:  # type: ignore[return]  # abort raises
        await self._authorize(request.auth_token, context)
        if self._receiver is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this engine is not a KV consumer")
        transfers = self._receiver.transfers
        give_up = time.monotonic() + min(request.wait_ms / 1000, MAX_TARGET_WAIT_S)
        while (t := transfers.get(request.transfer_id)) is None and time.monotonic() < give_up:
            await asyncio.sleep(TARGET_POLL_S)
        return pb.HeldBlocksReply(scheduled=t is not None, first_block=t.first_block if t else 0)

    async def nixl_target(self, request: pb.NixlTargetRequest, context) -> pb.NixlTargetReply:  # type: ignore[return]  # abort raises
        await self._authorize(request.auth_token, context)
        if self._nixl is None:
            return pb.NixlTargetReply(status=pb.NixlTargetReply.NO_NIXL)
        try:
            return await self._nixl.target(request)
        except (ChunkError, TransferNotWanted) as e:
            await context.abort(status_for(e), str(e))

    async def nixl_written(self, request: pb.NixlWrittenRequest, context) -> pb.PushAck:  # type: ignore[return]  # abort raises
        await self._authorize(request.auth_token, context)
        if self._nixl is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this engine takes no NIXL writes")
        try:
            return self._nixl.written(request)
        except TransferNotWanted as e:
            await context.abort(status_for(e), str(e))

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Push": grpc.stream_unary_rpc_method_handler(
                    self.push,
                    request_deserializer=decode_kv_chunk,
                    response_serializer=pb.PushAck.SerializeToString,
                ),
                "Abort": grpc.unary_unary_rpc_method_handler(
                    self.abort,
                    request_deserializer=pb.AbortTransferRequest.FromString,
                    response_serializer=pb.AbortTransferReply.SerializeToString,
                ),
                "Stats": grpc.unary_unary_rpc_method_handler(
                    self.stats,
                    request_deserializer=pb.KVStatsRequest.FromString,
                    response_serializer=pb.KVStats.SerializeToString,
                ),
                "OpenDataChannel": grpc.unary_unary_rpc_method_handler(
                    self.open_data_channel,
                    request_deserializer=pb.DataChannelRequest.FromString,
                    response_serializer=pb.DataChannel.SerializeToString,
                ),
                "HeldBlocks": grpc.unary_unary_rpc_method_handler(
                    self.held_blocks,
                    request_deserializer=pb.HeldBlocksRequest.FromString,
                    response_serializer=pb.HeldBlocksReply.SerializeToString,
                ),
                "NixlTarget": grpc.unary_unary_rpc_method_handler(
                    self.nixl_target,
                    request_deserializer=pb.NixlTargetRequest.FromString,
                    response_serializer=pb.NixlTargetReply.SerializeToString,
                ),
                "NixlWritten": grpc.unary_unary_rpc_method_handler(
                    self.nixl_written,
                    request_deserializer=pb.NixlWrittenRequest.FromString,
                    response_serializer=pb.PushAck.SerializeToString,
                ),
            },
        )


async def start_kv_server(service: KVTransferService, settings: KVEndpointSettings) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=server_options(bulk_channel_options(settings.chunk_bytes)))
    server.add_generic_rpc_handlers((service.handler(),))
    port = add_port(server, f"{settings.host}:{settings.port}", settings.tls)
    if port == 0:
        raise OSError(f"could not bind the KV endpoint on {settings.host}:{settings.port}")
    await server.start()
    return server, port


class KVClient:
    """Pushes chunks to consumers over the configured data path; one set of gRPC
    channels per consumer endpoint."""

    def __init__(self, settings: KVEndpointSettings) -> None:
        self._settings = settings
        self._channels: dict[str, list[grpc.aio.Channel]] = {}
        self._data_channels: dict[str, tuple[str, int]] = {}
        self._rr = itertools.count()
        # Built once: it reads the certificate files.
        self._tls_context = settings.tls.client_context() if settings.tls.enabled else None

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channels = self._channels.get(endpoint)
        if channels is None:
            options = bulk_channel_options(self._settings.chunk_bytes)
            channels = [open_channel(endpoint, self._settings.tls, options) for _ in range(self._settings.streams_per_transfer)]
            self._channels[endpoint] = channels
        return channels[next(self._rr) % len(channels)]

    async def push_over_data_channel(self, endpoint: str, chunks: AsyncIterator[tuple[bytes, list[memoryview]]], timeout: float) -> None:
        """Send one stream of (header, payload parts) chunks on the consumer's raw-TCP data
        channel; raises TransferFailed."""
        try:
            host, port = await self._data_channel(endpoint)
            status, message = await asyncio.wait_for(push_over_tcp(host, port, chunks, timeout, self._tls_context), timeout)
        except (TimeoutError, OSError) as e:
            raise TransferFailed(f"push to {endpoint} failed: {e!r}", True) from None
        if status != "OK":
            raise TransferFailed(f"push to {endpoint} failed: {status} {message}", status in _RETRYABLE_NAMES)

    async def push_over_grpc(self, endpoint: str, chunks: AsyncIterator[tuple[bytes, list[memoryview]]], timeout: float) -> None:
        """Send one stream of chunks as a gRPC client stream; raises TransferFailed."""
        call = self._channel(endpoint).stream_unary(
            PUSH, request_serializer=lambda chunk: encode_kv_chunk(*chunk), response_deserializer=pb.PushAck.FromString
        )
        try:
            await call(chunks, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise TransferFailed(f"push to {endpoint} failed: {e.code().name} {e.details()}", e.code() in _RETRYABLE) from None

    async def _data_channel(self, endpoint: str) -> tuple[str, int]:
        if endpoint not in self._data_channels:
            reply = await self._control(endpoint, OPEN_DATA_CHANNEL, pb.DataChannelRequest(), pb.DataChannel, timeout=10)
            # A consumer bound to a wildcard address is reached the way we reached its endpoint.
            host = reply.host if reply.host not in ("", "0.0.0.0", "::") else endpoint.rsplit(":", 1)[0]
            self._data_channels[endpoint] = (host, reply.port)
        return self._data_channels[endpoint]

    async def held_blocks(self, endpoint: str, transfer_id: str, wait_s: float) -> int:
        """How many leading blocks of the transfer the consumer holds already: 0 where its
        request is not scheduled there within `wait_s`. Raises TransferFailed."""
        request = pb.HeldBlocksRequest(transfer_id=transfer_id, wait_ms=round(wait_s * 1000))
        reply = await self._control(endpoint, HELD_BLOCKS, request, pb.HeldBlocksReply, timeout=wait_s + 10)
        return reply.first_block

    async def nixl_target(self, endpoint: str, request: pb.NixlTargetRequest) -> pb.NixlTargetReply:
        return await self._control(endpoint, NIXL_TARGET, request, pb.NixlTargetReply, timeout=request.wait_ms / 1000 + 10)

    async def nixl_written(self, endpoint: str, request: pb.NixlWrittenRequest) -> None:
        await self._control(endpoint, NIXL_WRITTEN, request, pb.PushAck, timeout=10)

    async def _control(self, endpoint: str, method: str, request, reply_type, timeout: float):
        """One control RPC carrying the cluster token; raises TransferFailed."""
        request.auth_token = self._settings.auth_token
        call = self._channel(endpoint).unary_unary(
            method, request_serializer=type(request).SerializeToString, response_deserializer=reply_type.FromString
        )
        try:
            return await call(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise TransferFailed(f"{method} at {endpoint} failed: {e.code().name} {e.details()}", e.code() in _RETRYABLE) from None

    async def abort(self, endpoint: str, transfer_id: str, reason: str) -> None:
        request = pb.AbortTransferRequest(transfer_id=transfer_id, reason=reason)
        try:
            await self._control(endpoint, ABORT, request, pb.AbortTransferReply, timeout=5)
        except TransferFailed as e:
            logger.warning("could not tell %s that transfer %s is aborted: %s", endpoint, transfer_id, e)

    async def close(self) -> None:
        for channels in self._channels.values():
            for channel in channels:
                await channel.close()
        self._channels.clear()


async def fetch_kv_stats(endpoint: str, timeout: float = 5.0, tls: TLSFiles = TLSFiles()) -> pb.KVStats:
    async with open_channel(endpoint, tls) as channel:
        call = channel.unary_unary(
            STATS,
            request_serializer=pb.KVStatsRequest.SerializeToString,
            response_deserializer=pb.KVStats.FromString,
        )
        return await call(pb.KVStatsRequest(), timeout=timeout)
