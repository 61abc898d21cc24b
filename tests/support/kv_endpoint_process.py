"""A KV endpoint in a process of its own, driven over a pipe, so a test can kill it in the
middle of a transfer as a crashed engine would die."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

from pdcluster.kv_transfer.settings import KVEndpointSettings

from tests.support.kv_fakes import endpoint, paged_layers


def _serve(conn, settings: dict, seed: int | None, consume: bool) -> None:
    ep = endpoint(paged_layers(seed=seed), KVEndpointSettings(**settings), consume=consume)
    conn.send(ep.address)
    while True:
        command, *args = conn.recv()
        if command == "expect":
            ep.receiver.expect(*args)
        elif command == "add_layers":  # (SaveSpec, layer indexes)
            spec, layers = args
            for layer in layers:
                ep.sender.add_layer(spec, layer)
        elif command == "stats":
            conn.send(ep.stats.snapshot())
            continue
        conn.send(None)


class EndpointProcess:
    def __init__(self, settings: dict, *, seed: int | None, consume: bool) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, settings, seed, consume), daemon=True)
        self._process.start()
        self.address = self._conn.recv()

    def call(self, *message):
        self._conn.send(message)
        return self._conn.recv()

    def kill(self) -> None:
        os.kill(self._process.pid, signal.SIGKILL)
        self._process.join(10)

    def close(self) -> None:
        if self._process.is_alive():
            self.kill()
