"""`pdcluster lab`'s plan, before anything is made: its hosts and addresses, the commands that
cable them to the bridge and shape their links, and the errors for a lab that cannot be."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdcluster.lab.lab_network import cut_commands, network_commands, rate_bits, restore_commands
from pdcluster.lab.lab_spec import LabSpec


def test_hosts_get_a_role_an_address_and_a_namespace_each():
    spec = LabSpec(name="lab1", prefill_hosts=2, decode_hosts=1, router_hosts=1)
    hosts = [(h.name, h.address, h.netns, h.resource) for h in spec.hosts()]
    assert hosts == [
        ("head", "10.77.0.1", "lab1-head", None),
        ("prefill-1", "10.77.0.11", "lab1-prefill-1", "prefill_pool"),
        ("prefill-2", "10.77.0.12", "lab1-prefill-2", "prefill_pool"),
        ("decode-1", "10.77.0.21", "lab1-decode-1", "decode_pool"),
        ("router-1", "10.77.0.31", "lab1-router-1", "router_pool"),
    ]
    with pytest.raises(ValueError, match="has no host 'decode-2'"):
        spec.host("decode-2")


def test_each_host_is_cabled_to_the_switch_and_its_link_shaped():
    commands = [" ".join(c) for c in network_commands(LabSpec(name="lab1", decode_hosts=0, link="10gbit"))]
    assert commands[:3] == ["ip netns add lab1-switch", "ip -n lab1-switch link add br0 type bridge", "ip -n lab1-switch link set br0 up"]
    assert "ip link add eth0 netns lab1-prefill-1 type veth peer name port1 netns lab1-switch" in commands
    assert "ip -n lab1-prefill-1 addr add 10.77.0.11/24 dev eth0" in commands
    # 10 ms worth of the rate as the bucket's burst
    assert "ip netns exec lab1-head tc qdisc replace dev eth0 root tbf rate 10gbit burst 12500000 latency 50ms" in commands
    delayed = [" ".join(c) for c in network_commands(LabSpec(name="lab1", decode_hosts=0, link="1gbit,200us"))]
    assert "ip netns exec lab1-head tc qdisc replace dev eth0 root netem delay 200us rate 1gbit" in delayed
    assert rate_bits("500mbit") == 5e8 and rate_bits("1gbps") == 8e9


def test_a_host_is_cut_off_by_its_cable_or_by_routes_to_nowhere_and_restored():
    spec = LabSpec(name="lab1", prefill_hosts=1, decode_hosts=1)
    decode, head = spec.host("decode-1"), spec.host("head")
    assert [" ".join(c) for c in cut_commands(spec, decode, [])] == ["ip -n lab1-switch link set port2 down"]
    assert [" ".join(c) for c in cut_commands(spec, decode, [head])] == [
        "ip -n lab1-decode-1 route replace blackhole 10.77.0.1/32",
        "ip -n lab1-head route replace blackhole 10.77.0.21/32",
    ]
    assert [" ".join(c) for c in restore_commands(spec, decode)] == [
        "ip -n lab1-switch link set port2 up",
        "ip -n lab1-decode-1 route flush type blackhole",
        "ip -n lab1-head route flush type blackhole to 10.77.0.21/32",
        "ip -n lab1-prefill-1 route flush type blackhole to 10.77.0.21/32",
    ]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"link": "fast"}, "a link's rate is like 10gbit"),
        ({"link": "1gbit,soon"}, "a link's delay is like 200us"),
        ({"subnet": "8.8.8.0/24"}, "private IPv4"),
        ({"name": "Lab-1"}, "should match pattern"),
        ({"ssh": True, "ray": True}, "gets its Ray from `ray up`"),
    ],
)
def test_a_lab_that_cannot_be_is_refused_before_anything_is_made(fields, message):
    with pytest.raises(ValidationError, match=message):
        LabSpec(**fields)
