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
    for i, host in enumerate(spec.hosts()):
        port = f"port{i}"
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
