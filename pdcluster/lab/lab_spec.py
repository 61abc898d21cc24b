"""What a lab is made of: its hosts (a head, prefill, decode and router hosts), their
addresses, and the shape of each host's link."""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, Field, field_validator, model_validator

# Each host's role and the Ray resource its node advertises (the pools' `node_resource`).
POOL_RESOURCES = {"prefill": "prefill_pool", "decode": "decode_pool", "router": "router_pool"}
RAY_PORT = 6379  # the head's GCS: `pdcluster serve --address HEAD:6379`
REDIS_PORT = 6380  # the head's Redis registry, beside the GCS


class LabHost(BaseModel):
    name: str  # head, prefill-1, decode-1, router-1, ...
    role: str  # head, prefill, decode, router
    address: str
    netns: str

    @property
    def resource(self) -> str | None:
        return POOL_RESOURCES.get(self.role)


class LabSpec(BaseModel):
    name: str = Field("pdlab", pattern=r"^[a-z][a-z0-9]{0,7}$", description="prefix of the lab's namespaces")
    subnet: str = Field("10.77.0.0/24", description="the lab's addresses (only inside its namespaces)")
    prefill_hosts: int = Field(1, ge=0, le=8)
    decode_hosts: int = Field(1, ge=0, le=8)
    router_hosts: int = Field(0, ge=0, le=8)
    link: str | None = Field(None, description="each host's link: RATE[,DELAY], e.g. 10gbit or 10gbit,200us")
    ray: bool = Field(True, description="start a Ray node on every host (the head's with Redis)")
    ssh: bool = Field(False, description="sshd and a home of its own on every host, for `ray up` (deploy/ray/local.yaml)")

    @field_validator("subnet")
    @classmethod
    def _a_24(cls, value: str) -> str:
        net = ipaddress.ip_network(value)
        if net.version != 4 or net.prefixlen > 24 or not net.is_private:
            raise ValueError(f"the lab's subnet must be a private IPv4 /24 or wider, not {value}")
        return str(net)

    @field_validator("link")
    @classmethod
    def _a_link(cls, value: str | None) -> str | None:
        if value is not None:
            link_shape(value)
        return value

    @model_validator(mode="after")
    def _ray_from_ray_up(self) -> LabSpec:
        if self.ssh and self.ray:
            raise ValueError("a lab with sshd gets its Ray from `ray up` on the lab's cluster.yaml: the lab starts none (ray: false)")
        return self

    def hosts(self) -> list[LabHost]:
        base = ipaddress.ip_network(self.subnet).network_address
        roles = [("head", 1, 1)] + [
            (role, count, first) for role, count, first in (("prefill", self.prefill_hosts, 11), ("decode", self.decode_hosts, 21))
        ]
        roles.append(("router", self.router_hosts, 31))
        hosts = []
        for role, count, first in roles:
            for i in range(count):
                name = "head" if role == "head" else f"{role}-{i + 1}"
                hosts.append(LabHost(name=name, role=role, address=str(base + first + i), netns=f"{self.name}-{name}"))
        return hosts

    def host(self, name: str) -> LabHost:
        for h in self.hosts():
            if h.name == name:
                return h
        raise ValueError(f"lab {self.name} has no host {name!r}; it has {', '.join(h.name for h in self.hosts())}")

    @property
    def switch_netns(self) -> str:
        return f"{self.name}-switch"


def link_shape(text: str) -> tuple[str, str | None]:
    """`RATE[,DELAY]` as tc writes them (10gbit, 500mbit; 200us, 1ms)."""
    rate, _, delay = text.partition(",")
    if not re.fullmatch(r"\d+(\.\d+)?([kmg]?bit|[kmg]?bps)", rate.strip().lower()):
        raise ValueError(f"a link's rate is like 10gbit or 500mbit, not {rate!r}")
    if delay and not re.fullmatch(r"\d+(\.\d+)?(us|ms|s)", delay.strip().lower()):
        raise ValueError(f"a link's delay is like 200us or 1ms, not {delay!r}")
    return rate.strip().lower(), (delay.strip().lower() or None)
