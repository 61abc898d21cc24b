"""The raw-TCP data path for KV chunks, negotiated over gRPC (`OpenDataChannel`).

Python gRPC tops out well below what a socket carries here (see bench/RESULTS.md), so the
bulk bytes may skip it: one connection per stream of a transfer, carrying frames
[u32 header length][msgpack KVChunkHeader][payload] and then a zero length. The consumer
answers once with a status frame [u8 name length][status name][u32 length][message]
(status names are gRPC's), early if it refuses a chunk. Payloads go straight from the producer's
KV blocks into the consumer's (where the layout keeps blocks contiguous; else through a
packed copy), and the same KVReceiver checks every chunk as on the gRPC path.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable

from pdcluster.kv_transfer.chunk_header import MAX_HEADER_BYTES, ChunkError, KVChunkHeader
from pdcluster.kv_transfer.kv_receiver import KVReceiver

logger = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
SOCKET_BUFFER_BYTES = 8 << 20
DRAIN_AFTER_ERROR_S = 5.0
TLS_HANDSHAKE_TIMEOUT_S = 30.0


def _status_frame(name: str, message: str) -> bytes:
    msg = message.encode()[:65536]
    return bytes((len(name),)) + name.encode() + _U32.pack(len(msg)) + msg


def _recv_exactly(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed mid-frame")
        got += n


class TcpChunkServer:
    """Consumer side: accepts data connections and feeds their chunks to a KVReceiver."""

    def __init__(
        self, receiver: KVReceiver | None, host: str, port: int, status_for: Callable[[Exception], str], tls: ssl.SSLContext | None = None
    ) -> None:
        self._receiver = receiver
        self._tls = tls
        self._status_for = status_for
        self._sock = socket.create_server((host, port))
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept_loop, name="pdcluster-kv-tcp", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        if self._tls is not None:
            try:
                conn.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
                conn = self._tls.wrap_socket(conn, server_side=True)
                conn.settimeout(None)
            except OSError:  # no TLS, or a certificate our CA did not sign: not one of ours
                conn.close()
                return
        word = memoryview(bytearray(4))
        with conn:
            try:
                while True:
                    _recv_exactly(conn, word)
                    (header_len,) = _U32.unpack(word)
                    if header_len == 0:
                        conn.sendall(_status_frame("OK", ""))
                        return
                    if header_len > MAX_HEADER_BYTES:
                        raise ChunkError(f"chunk header of {header_len} bytes is too large")
                    raw = bytearray(header_len)
                    _recv_exactly(conn, memoryview(raw))
                    header = KVChunkHeader.decode(bytes(raw))
                    if self._receiver is None:
                        raise ChunkError("this engine is not a KV consumer")
                    # Received straight into the KV blocks where possible.
                    landing = self._receiver.land(header, "tcp")
                    try:
                        for part in landing.parts:
                            _recv_exactly(conn, part)
                    except BaseException:
                        self._receiver.abandon(landing)
                        raise
                    self._receiver.landed(landing)
            except ConnectionError:
                return  # the producer went away; it retries or gives up on its side
            except Exception as e:  # a refused chunk: tell the producer why, then hang up
                self._refuse(conn, self._status_for(e), str(e))

    def _refuse(self, conn: socket.socket, status: str, message: str) -> None:
        try:
            conn.sendall(_status_frame(status, message))
            conn.shutdown(socket.SHUT_WR)
            # Read what is still in flight so closing does not reset the connection
            # before the producer has read our status.
            conn.settimeout(DRAIN_AFTER_ERROR_S)
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self._sock.close()


def _read_status(sock: socket.socket) -> tuple[str, str]:
    def exactly(n: int) -> bytes:
        data = bytearray(n)
        _recv_exactly(sock, memoryview(data))
        return bytes(data)

    name = exactly(exactly(1)[0]).decode()
    (length,) = _U32.unpack(exactly(4))
    return name, exactly(length).decode(errors="replace")


def _status_waiting(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


async def push_over_tcp(
    host: str,
    port: int,
    chunks: AsyncIterator[tuple[bytes, list[memoryview]]],
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> tuple[str, str]:
    """Send every chunk on one connection; returns the consumer's (status, message).

    Sends block in a worker thread, like the raw-socket ceiling: the kernel copies each
    payload from the packed tensor without waking the event loop per partial write.
    """
    loop = asyncio.get_running_loop()
    sock = await loop.run_in_executor(None, lambda: socket.create_connection((host, port), timeout=timeout))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = await loop.run_in_executor(None, lambda: tls.wrap_socket(sock, server_hostname=host))
        try:
            async for header, parts in chunks:
                if _status_waiting(sock):
                    break  # refused early: stop sending and read why
                await loop.run_in_executor(None, _send_frame, sock, header, parts)
            else:
                await loop.run_in_executor(None, sock.sendall, _U32.pack(0))
        except OSError:
            if not _status_waiting(sock):
                raise
        return await loop.run_in_executor(None, _read_status, sock)
    finally:
        sock.close()


def _send_frame(sock: socket.socket, header: bytes, parts: list[memoryview]) -> None:
    sock.sendall(_U32.pack(len(header)) + header)
    for part in parts:
        sock.sendall(part)
