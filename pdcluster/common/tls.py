"""TLS for every pdcluster connection: gRPC (router, workers, KV control) and the raw-TCP
KV data channel. With a CA file, each side must present a certificate the CA signed
(mutual TLS), so only the cluster's own processes can connect."""

from __future__ import annotations

import ssl

import grpc
from pydantic import BaseModel, ConfigDict, Field

from pdcluster.common.grpc_links import channel_options


class TLSFiles(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cert: str = Field("", description="PEM certificate: serve and connect over TLS")
    key: str = Field("", description="PEM private key of the certificate")
    ca: str = Field("", description="PEM CA bundle: peers must present a certificate it signed (mTLS)")

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)

    def _pem(self) -> tuple[bytes, bytes, bytes | None]:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return read(self.key), read(self.cert), read(self.ca) if self.ca else None

    def server_credentials(self, clients_need_cert: bool = True) -> grpc.ServerCredentials:
        key, cert, ca = self._pem()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=clients_need_cert and ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert, ca = self._pem()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        # No TLS 1.3 session tickets: the producer reads any data that arrives while it sends
        # as the consumer's early refusal, so nothing may arrive unasked.
        context.num_tickets = 0
        if self.ca:
            context.load_verify_locations(self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca or None)
        context.load_cert_chain(self.cert, self.key)
        return context


def add_port(server: grpc.aio.Server, address: str, tls: TLSFiles, clients_need_cert: bool = True) -> int:
    """`clients_need_cert=False` for public APIs, whose clients authenticate with an API key."""
    if tls.enabled:
        return server.add_secure_port(address, tls.server_credentials(clients_need_cert))
    return server.add_insecure_port(address)


def open_channel(address: str, tls: TLSFiles, options=()) -> grpc.aio.Channel:
    options = channel_options(options)
    if tls.enabled:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
    return grpc.aio.insecure_channel(address, options=options)
