"""A loopback TCP proxy that can flip one byte of a connection's client-to-server stream:
real corruption in flight, below gRPC or our framing. The byte at offset `corrupt_at` (given
at start, or to `arm`) is flipped in the first connection whose stream gets that far (a
connection that carries less, such as a transfer's stream with no chunk to send, is spared)."""

from __future__ import annotations

import asyncio
import threading


class CorruptingProxy:
    def __init__(self, upstream: str, corrupt_at: int | None = None) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._corrupt_at = corrupt_at
        self.corrupted = False
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        ready.set()
        self._loop.run_forever()

    def arm(self, corrupt_at: int) -> None:
        self.corrupted = False
        self._corrupt_at = corrupt_at

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False), return_exceptions=True)

    async def _pipe(self, reader, writer, to_server: bool) -> None:
        offset = 0
        try:
            while data := await reader.read(1 << 16):
                at = self._corrupt_at if to_server else None
                if at is not None and offset <= at < offset + len(data):
                    data = bytearray(data)
                    data[at - offset] ^= 0xFF
                    self._corrupt_at, self.corrupted = None, True
                offset += len(data)
                writer.write(bytes(data))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
