"""The router's listening ports, bound before anything else starts (as `vllm serve` binds its
socket before it loads its engine): a taken port fails at once, naming it, and no process the
cluster starts meanwhile (a worker on an ephemeral port) can take it."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pdcluster.router.config import RouterConfig


class PortTaken(OSError):
    pass


@dataclass
class RouterListeners:
    http: socket.socket  # listening; uvicorn serves on it
    grpc_hold: socket.socket  # bound, not listening: keeps the gRPC port until the gRPC server binds it

    def release_grpc_port(self) -> int:
        """The held gRPC port, freed for the gRPC server to bind now."""
        port = self.grpc_hold.getsockname()[1]
        self.grpc_hold.close()
        return port

    def close(self) -> None:
        self.http.close()
        self.grpc_hold.close()


def _bind(host: str, port: int, what: str, listen: bool) -> socket.socket:
    try:
        if listen:
            sock = socket.create_server((host, port))
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, port))
    except OSError as e:
        raise PortTaken(f"cannot listen on {host}:{port} ({what}): {e.strerror or e}") from None
    return sock


def bind_listeners(config: RouterConfig) -> RouterListeners:
    http = _bind(config.host, config.port, "OpenAI HTTP, --port", listen=True)
    http.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    try:
        grpc_hold = _bind(config.host, config.grpc_port, "gRPC Inference, --grpc-port", listen=False)
    except PortTaken:
        http.close()
        raise
    return RouterListeners(http, grpc_hold)
