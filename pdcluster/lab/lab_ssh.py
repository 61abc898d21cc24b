"""A lab whose hosts are machines to SSH into, as `ray up` needs them: sshd on every host, one
key pair that logs in as root everywhere, and each host's own home (its `/etc/passwd` names it)
with what an on-prem machine of `deploy/ray/local.yaml` has there: the checkout at
`~/pdcluster` (the machine's, as an NFS home would share it) and `~/pdcluster-pool.json`
naming the host's pool. `cluster_config` is local.yaml for the lab's addresses and key."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from pdcluster.lab.lab_spec import LabHost, LabSpec

CHECKOUT = Path(__file__).resolve().parents[2]
LOCAL_YAML = CHECKOUT / "deploy" / "ray" / "local.yaml"
SSHD = "/usr/sbin/sshd"
# local.yaml's setup step that installs the checkout on a machine: a lab's hosts share this one's.
_INSTALL = "cd ~/pdcluster && scripts/install.sh"


def ssh_dir(lab: Path) -> Path:
    return lab / "ssh"


def private_key(lab: Path) -> Path:
    return ssh_dir(lab) / "id_ed25519"


def cluster_name(spec: LabSpec) -> str:
    return f"pdcluster-lab-{spec.name}"


def make_keys(lab: Path) -> None:
    """The lab's login key (its public half authorized on every host) and the hosts' key."""
    keys = ssh_dir(lab)
    keys.mkdir(parents=True, exist_ok=True)
    for key in (private_key(lab), keys / "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pdcluster-lab", "-f", str(key)], check=True)
    (keys / "authorized_keys").write_text(private_key(lab).with_suffix(".pub").read_text())


def make_home(spec: LabSpec, lab: Path, host: LabHost) -> Path:
    """The host's home, and the files bound over the machine's on the host: a passwd naming
    that home root's; hosts naming the lab's hosts (Ray's and torch's own lookups of the
    host's name); and a resolver that fails at once, as on a network without DNS (its default
    route would otherwise send lookups out to time out)."""
    home = lab / "home" / host.name
    home.mkdir(parents=True, exist_ok=True)
    (home / "pdcluster").symlink_to(CHECKOUT)
    (home / ".cache").symlink_to(Path.home() / ".cache")  # the generated model and compiled graphs, as on one machine
    (home / "pdcluster-pool.json").write_text(json.dumps({host.resource: 1} if host.resource else {}))
    passwd = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "root":
            fields[5] = str(home)
        passwd.append(":".join(fields))
    (lab / "home" / f"{host.name}.passwd").write_text("\n".join(passwd) + "\n")
    names = "".join(f"{h.address} {h.name}\n" for h in spec.hosts())
    (lab / "home" / f"{host.name}.hosts").write_text(f"127.0.0.1 localhost\n{names}")
    (lab / "home" / f"{host.name}.resolv.conf").write_text("nameserver 127.0.0.1\n")
    return home


def sshd_config(lab: Path, host: LabHost) -> Path:
    keys = ssh_dir(lab)
    config = keys / f"sshd_{host.name}.conf"
    config.write_text(
        f"ListenAddress {host.address}\n"
        f"HostKey {keys / 'host_key'}\n"
        f"PidFile {keys / f'sshd_{host.name}.pid'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n"  # the lab's files are under /tmp, not a home's modes
    )
    return config


def host_boot_commands(lab: Path, host: LabHost) -> list[list[str]]:
    """Run on the host at each boot: its home; its own /tmp/ray (Ray's sessions, sockets and the
    launcher's state, which nodes starting at once on a shared /tmp would mix up); a default
    route (the way a machine's own tools, Ray's address detection among them, find its
    address); and its sshd."""
    ray_tmp = lab / "home" / f"{host.name}.ray"
    return [
        *(["mount", "--bind", str(lab / "home" / f"{host.name}.{name}"), f"/etc/{name}"] for name in ("passwd", "hosts", "resolv.conf")),
        ["mkdir", "-p", "/tmp/ray", str(ray_tmp)],
        ["mount", "--bind", str(ray_tmp), "/tmp/ray"],
        ["ip", "route", "replace", "default", "dev", "eth0"],
        ["mkdir", "-p", "/run/sshd"],
        [SSHD, "-f", str(sshd_config(lab, host))],
    ]


def cluster_config(spec: LabSpec, lab: Path) -> dict:
    """deploy/ray/local.yaml with the lab's addresses and key, less its install step."""
    config = yaml.safe_load(LOCAL_YAML.read_text())
    hosts = spec.hosts()
    config["cluster_name"] = cluster_name(spec)
    config["provider"].update(head_ip=spec.host("head").address, worker_ips=[h.address for h in hosts if h.role != "head"])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(private_key(lab))}
    config["file_mounts"] = {}  # ~/pdcluster on every host is this checkout
    config["setup_commands"] = [command for command in config["setup_commands"] if command != _INSTALL]
    return config
