"""A lossy, slow link between two lab hosts, without the kernel's netem (which this project's
kernels lack): what one host sends to some peers is routed into a TUN device, and this process,
in the host's network, drops a share of the packets and sends the rest out of eth0 after a
fixed delay. One direction, as netem on one interface; the reply path is untouched.

`python -m pdcluster.lab.link_impairment --peer IP=MAC [--peer ...] --src IP --delay-ms D --loss P
--stats FILE`, run in the host's network namespace (`lab_hosts.impair` starts it). SIGTERM takes
the route away with the TUN device and writes what it relayed and dropped to FILE."""

from __future__ import annotations

import argparse
import asyncio
import collections
import fcntl
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_ETH_P_IP = 0x0800
READY = "impairing"  # its first line on stdout, once the route is in place


class Impairment:
    def __init__(self, tun: int, out: socket.socket, macs: dict[bytes, bytes], delay_s: float, loss: float) -> None:
        self.tun, self.out, self.macs = tun, out, macs  # each peer's IPv4 address (4 bytes) to its MAC
        self.delay_s, self.loss = delay_s, loss
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # FIFO: one delay for all
        self.relayed = self.dropped = 0
        self.random = random.Random()
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def on_readable(self) -> None:
        while True:
            try:
                packet = os.read(self.tun, 65536)
            except BlockingIOError:
                break
            if packet[0] >> 4 != 4 or packet[16:20] not in self.macs:  # the device's own IPv6 chatter
                continue
            if self.random.random() < self.loss:
                self.dropped += 1
                continue
            self.queue.append((self.loop.time() + self.delay_s, packet))
        self._flush()

    def _flush(self) -> None:
        self._timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            self._send(self.queue.popleft()[1])
        if self.queue:
            self._timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _send(self, packet: bytes) -> None:
        try:
            self.out.sendto(packet, ("eth0", _ETH_P_IP, 0, 0, self.macs[packet[16:20]]))  # by its destination
            self.relayed += 1
        except OSError:  # a full or downed link loses the packet, as a real one would
            self.dropped += 1


def open_tun(name: str) -> int:
    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(tun, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return tun


async def run(args: argparse.Namespace) -> dict:
    device = "impair0"
    tun = open_tun(device)
    peers = dict(peer.split("=") for peer in args.peer)
    commands = [
        ["ip", "link", "set", device, "up"],
        # Replies come back on eth0 while the routes to the peers point here: no reverse-path check.
        ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.eth0.rp_filter=0"],
    ]
    commands += [["ip", "route", "replace", f"{ip}/32", "dev", device, "src", args.src] for ip in peers]
    for command in commands:
        subprocess.run(command, check=True)
    out = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_IP))
    macs = {socket.inet_aton(ip): bytes.fromhex(mac.replace(":", "")) for ip, mac in peers.items()}
    impairment = Impairment(tun, out, macs, args.delay_ms / 1000, args.loss)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_reader(tun, impairment.on_readable)
    started = time.monotonic()
    print(READY, flush=True)
    await stop.wait()
    os.close(tun)  # its route goes with the device
    return {
        "peers": sorted(peers),
        "delay_ms": args.delay_ms,
        "loss": args.loss,
        "relayed": impairment.relayed,
        "dropped": impairment.dropped,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", action="append", required=True, help="IP=MAC of a peer whose packets are impaired")
    parser.add_argument("--src", required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--stats", required=True)
    args = parser.parse_args()
    stats = asyncio.run(run(args))
    with open(args.stats, "w") as f:
        json.dump(stats, f)


if __name__ == "__main__":
    main()
