"""The `ip` and `tc` commands that build a lab's network: a switch namespace holding a bridge,
and per host a namespace whose eth0 is a veth cabled to the bridge. The lab's addresses live
only inside its namespaces; the machine's own stack is not touched."""

from __future__ import annotations

import re

from pdcluster.lab.lab_spec import LabHost, LabSpec, link_shape

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def network_commands(spec: LabSpec) -> list[list[str]]:
    sw = spec.switch_netns
    commands = [
        ["ip", "netns", "add", sw],
        ["ip", "-n", sw, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", sw, "link", "set", "br0", "up"],
    ]
    prefix = spec.subnet.split("/")[1]
    for host in spec.hosts():
        port = _port(spec, host)
        commands += [
            ["ip", "netns", "add", host.netns],
            ["ip", "link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", port, "netns", sw],
            ["ip", "-n", sw, "link", "set", port, "master", "br0"],
            ["ip", "-n", sw, "link", "set", port, "up"],
            ["ip", "-n", host.netns, "addr", "add", f"{host.address}/{prefix}", "dev", "eth0"],
            ["ip", "-n", host.netns, "link", "set", "eth0", "up"],
            ["ip", "-n", host.netns, "link", "set", "lo", "up"],
        ]
        if spec.link:
            commands.append(shape_commands(host, spec.link))
    return commands


def cut_commands(spec: LabSpec, host: LabHost, peers: list[LabHost]) -> list[list[str]]:
    """Cut a host off: from every host (its cable: its port on the bridge goes down), or from
    the given peers only (a partition: a route to nowhere each way). Packets are dropped
    silently, as on a broken link; connections wait, and live on if it returns in time."""
    if not peers:
        return [["ip", "-n", spec.switch_netns, "link", "set", _port(spec, host), "down"]]
    commands = []
    for peer in peers:
        commands += [
            ["ip", "-n", host.netns, "route", "replace", "blackhole", f"{peer.address}/32"],
            ["ip", "-n", peer.netns, "route", "replace", "blackhole", f"{host.address}/32"],
        ]
    return commands


def restore_commands(spec: LabSpec, host: LabHost) -> list[list[str]]:
    """Undo every cut of the host: its cable back, and the partitions from it gone both ways."""
    commands = [
        ["ip", "-n", spec.switch_netns, "link", "set", _port(spec, host), "up"],
        ["ip", "-n", host.netns, "route", "flush", "type", "blackhole"],
    ]
    for peer in spec.hosts():
        if peer != host:
            commands.append(["ip", "-n", peer.netns, "route", "flush", "type", "blackhole", "to", f"{host.address}/32"])
    return commands


def _port(spec: LabSpec, host: LabHost) -> str:
    """The host's port on the lab's bridge."""
    return f"port{spec.hosts().index(host)}"


def shape_commands(host: LabHost, link: str) -> list[str]:
    """Shapes what the host sends (its egress): a token bucket at the rate, and netem for a delay."""
    rate, delay = link_shape(link)
    tc = ["ip", "netns", "exec", host.netns, "tc", "qdisc", "replace", "dev", "eth0", "root"]
    if delay:
        return [*tc, "netem", "delay", delay, "rate", rate]
    burst = max(64 * 1024, int(rate_bits(rate) / 8 / 100))  # 10 ms at the rate, at least 64 KiB
    return [*tc, "tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


def rate_bits(rate: str) -> float:
    number, unit, kind = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", rate).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit] * (8 if kind == "bps" else 1)
