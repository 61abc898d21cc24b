"""Picking a free loopback port for a server started by hand (tests, benchmarks), and
telling a loopback address from others."""

from __future__ import annotations

import ipaddress
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # empty, or a host name
        return False
