"""The consumer's watch over the producers it waits for.

A producer that stops answering (killed, frozen, cut off) fails the transfers still waiting
on it within seconds, so vLLM recomputes those prompts instead of holding their blocks until
`load_timeout_s`. A producer that is only busy still answers: the ping goes to its KV I/O
thread, which compute does not block, and one late answer is forgiven until
`producer_lost_after_s` of silence.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdcluster.common.periodic import cancel_all
from pdcluster.common.tls import open_channel
from pdcluster.kv_transfer.incoming_transfers import IncomingTransfers
from pdcluster.kv_transfer.kv_io_loop import KVIOLoop
from pdcluster.kv_transfer.kv_transfer_service import STATS
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.protos import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0


class ProducerWatch:
    def __init__(self, transfers: IncomingTransfers, settings: KVEndpointSettings, io: KVIOLoop) -> None:
        self._transfers = transfers
        self._settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._silent_since: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        io.call_soon(self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            producers = self._transfers.waiting_producers()
            for endpoint in set(self._channels) - producers:
                self._silent_since.pop(endpoint, None)
                await self._channels.pop(endpoint).close()
            await asyncio.gather(*(self._check(endpoint) for endpoint in producers))

    async def _check(self, endpoint: str) -> None:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = open_channel(endpoint, self._settings.tls)
        ping = channel.unary_unary(
            STATS, request_serializer=pb.KVStatsRequest.SerializeToString, response_deserializer=pb.KVStats.FromString
        )
        asked = time.monotonic()
        try:
            await ping(pb.KVStatsRequest(), timeout=PING_TIMEOUT_S)
            self._silent_since.pop(endpoint, None)
            return
        except grpc.aio.AioRpcError as e:
            # Refused (UNAVAILABLE): its process is gone. A frozen one only times out and
            # may wake up and write: its transfers' blocks stay held until its lease ends.
            gone = e.code() == grpc.StatusCode.UNAVAILABLE
        silent_s = time.monotonic() - self._silent_since.setdefault(endpoint, asked)
        if silent_s >= self._settings.producer_lost_after_s:
            failed = self._transfers.fail_from(endpoint, f"producer {endpoint} has not answered for {silent_s:.0f}s", writes_stopped=gone)
            if failed:
                logger.warning("KV producer %s silent for %.0fs: %d transfers fail over to recompute", endpoint, silent_s, failed)

    async def aclose(self) -> None:
        await cancel_all([self._task])
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
