"""One engine's KV endpoint: its paged layers, the I/O loop, the served KVTransfer
service, and a sender and/or receiver. The connector's worker side is one of these."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch

from pdcluster.common.ports import is_loopback
from pdcluster.kv_transfer.kv_io_loop import KVIOLoop
from pdcluster.kv_transfer.kv_receiver import KVReceiver
from pdcluster.kv_transfer.kv_sender import KVSender
from pdcluster.kv_transfer.kv_transfer_service import KVClient, KVTransferService, start_kv_server, status_for
from pdcluster.kv_transfer.nixl_agent import NixlAgent, NixlUnavailable
from pdcluster.kv_transfer.nixl_consumer import NixlConsumer
from pdcluster.kv_transfer.nixl_producer import NixlProducer
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout
from pdcluster.kv_transfer.producer_watch import ProducerWatch
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.tcp_transport import TcpChunkServer
from pdcluster.kv_transfer.transfer_stats import TransferStats
from pdcluster.kv_transfer.transports import transports_for
from pdcluster.protos import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)


class KVEndpoint:
    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        num_blocks: int,
        block_size: int,
        settings: KVEndpointSettings,
        *,
        produce: bool,
        consume: bool,
        compile_seconds: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.layers = list(layers)
        self._compile_seconds = compile_seconds
        self.layout = PagedKVLayout.of(self.layers[0], num_blocks, block_size)
        self.settings = settings
        self.stats = TransferStats()
        self.progress = threading.Event()  # set whenever a transfer ends, either direction
        self.io = KVIOLoop()
        self.nixl = self._start_nixl()
        self.receiver = KVReceiver(self.layers, self.layout, settings, self.stats, self.progress) if consume else None
        self._producer_watch = ProducerWatch(self.receiver.transfers, settings, self.io) if self.receiver else None
        self.nixl_consumer = (
            NixlConsumer(self.nixl, self.receiver.transfers, self.layers, self.stats, settings) if self.receiver and self.nixl else None
        )
        self._client = KVClient(settings) if produce else None
        self.sender = None
        if produce:
            nixl = NixlProducer(self.nixl, self._client, self.layers, settings) if self.nixl else None
            transports = transports_for(settings, self._client, self.layers, self.layout, nixl)
            self.sender = KVSender(self.io, self._client, transports, self.layout, settings, self.stats, self.progress)
        self._tcp = TcpChunkServer(
            self.receiver,
            settings.host,
            settings.data_port,
            lambda e: status_for(e).name,
            settings.tls.server_context() if settings.tls.enabled else None,
        )
        if settings.data_advertise:
            host, port_text = settings.data_advertise.rsplit(":", 1)
            data_channel = pb.DataChannel(host=host, port=int(port_text))
        else:
            data_channel = pb.DataChannel(host=settings.host, port=self._tcp.port)
        service = KVTransferService(self.receiver, self.kv_stats, settings.check_token, data_channel, self.nixl_consumer)
        self._server, port = self.io.run(start_kv_server(service, settings))
        self.address = f"{settings.host}:{port}"

    def _start_nixl(self) -> NixlAgent | None:
        """This engine's NIXL agent, with its KV registered, where the transport may use it."""
        if self.settings.transport not in ("nixl", "auto"):
            return None
        try:
            return NixlAgent(self.layers, self.layout, loopback_only=is_loopback(self.settings.host))
        except (NixlUnavailable, ValueError) as e:
            if self.settings.transport == "nixl":
                raise
            logger.info("no NIXL for KV transfer (%s): TCP carries it", e)
            return None

    def kv_stats(self) -> pb.KVStats:
        return pb.KVStats(
            **self.stats.snapshot(),
            pending_sends=self.sender.pending if self.sender else 0,
            pending_receives=self.receiver.pending if self.receiver else 0,
            staged_bytes=self.receiver.staged_bytes if self.receiver else 0,
            engine_compile_seconds=self._compile_seconds(),
        )

    def close(self) -> None:
        if not self.io.loop.is_running():
            return  # closed already
        if self._client is not None:
            self.io.run(self._client.close(), timeout=10)
        if self._producer_watch is not None:
            self.io.run(self._producer_watch.aclose(), timeout=10)
        if self.nixl_consumer is not None:
            self.io.run(self.nixl_consumer.aclose(), timeout=10)
        self.io.run(self._server.stop(grace=1.0), timeout=10)
        self._tcp.close()
        self.io.stop()
