"""Brings a lab up and down, and runs commands on its hosts. Each host is a network namespace
(its own address, cabled to the lab's bridge) with its own PID, mount and UTS namespaces, held
by an init process: `ray stop` on one host sees only that host's processes, and killing the
init ends every process the host ran. The machine's files are every host's, as a shared home
would be (a checkout anywhere, /tmp included, runs on every host). `down` finds a lab by its
namespaces, so it cleans up after a crash too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pdcluster.lab import lab_ssh, link_impairment
from pdcluster.lab.lab_network import cut_commands, network_commands, restore_commands
from pdcluster.lab.lab_spec import RAY_PORT, REDIS_PORT, LabHost, LabSpec

STATE_DIR = Path("/run/pdcluster-lab")
_CLONE_NEWNET = 0x40000000
_RAY_NODE = ["--num-cpus", "1", "--disable-usage-stats"]


class LabError(RuntimeError):
    pass


def up(spec: LabSpec) -> dict:
    """Builds the lab; on any failure tears down what it built. Returns its state."""
    _check_machine(spec)
    if existing_namespaces(spec.name):
        raise LabError(f"lab {spec.name} is up already: `pdcluster lab down --name {spec.name}` first")
    try:
        for command in network_commands(spec):
            _run(command)
        state = _save(spec, {host.name: _start_init(spec, host) for host in spec.hosts()})
        if spec.ssh:
            _make_ssh_hosts(spec)
        if spec.ray:
            _start_ray(spec)
        return state
    except BaseException:
        down(spec.name)
        raise


def down(name: str) -> list[str]:
    """Kills every process in the lab's namespaces and deletes them (their links go with them)."""
    removed = []
    for netns in existing_namespaces(name):
        pids = netns_pids(netns)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone(pids)
        _run(["ip", "netns", "del", netns])
        removed.append(netns)
    _state_file(name).unlink(missing_ok=True)
    shutil.rmtree(lab_dir(name), ignore_errors=True)  # its homes' links to the checkout go, never what they point at
    return removed


def cut(name: str, host: str, peers: list[str]) -> None:
    """Cut the host off from every other host, or from `peers` only (a partition)."""
    spec, _ = load(name)
    cut_off = spec.host(host)
    others = [spec.host(peer) for peer in peers]
    if cut_off in others:
        raise LabError(f"{host} cannot be cut off from itself")
    for command in cut_commands(spec, cut_off, others):
        _run(command)


def restore(name: str, host: str) -> None:
    """Undo every cut and impairment of the host."""
    spec, _ = load(name)
    relays = _impairments(spec.host(host))
    for relay in relays:
        relay.terminate()
    _wait_gone([relay.pid for relay in relays])
    for command in restore_commands(spec, spec.host(host)):
        _run(command)


def impair(name: str, host: str, peers: list[str], delay_ms: float, loss: float) -> None:
    """What `host` sends to `peers` arrives `delay_ms` late, and `loss` of it not at all (a
    relay in the host's network, `link_impairment`); `restore` ends it."""
    spec, _ = load(name)
    sender, receivers = spec.host(host), [spec.host(peer) for peer in peers]
    if sender in receivers or not receivers:
        raise LabError(f"{host} impairs its links to other hosts: not to {', '.join(peers) or 'none'}")
    if not (delay_ms >= 0 and 0 <= loss < 1):
        raise LabError(f"a delay is >= 0 ms and a loss in [0, 1): not {delay_ms} ms, {loss}")
    if _impairments(sender):
        raise LabError(f"{host}'s link is impaired already: `pdcluster lab restore {host}` first")
    argv = ["--src", sender.address]
    for receiver in receivers:
        mac = json.loads(_run(["ip", "-j", "-n", receiver.netns, "link", "show", "eth0"]))[0]["address"]
        argv += ["--peer", f"{receiver.address}={mac}"]
    stats = impairment_stats(name, host)
    stats.parent.mkdir(parents=True, exist_ok=True)
    stats.unlink(missing_ok=True)
    argv += ["--delay-ms", str(delay_ms), "--loss", str(loss), "--stats", str(stats)]
    relay = subprocess.Popen(
        ["ip", "netns", "exec", sender.netns, sys.executable, "-m", "pdcluster.lab.link_impairment", *argv],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # lives on after the command that started it; `down` kills it with the host's network
    )
    assert relay.stdout is not None
    if relay.stdout.readline().strip() != link_impairment.READY:
        relay.kill()
        raise LabError(f"the link impairment on {host} did not start (exit {relay.wait()})")


def impairment_stats(name: str, host: str) -> Path:
    """What the host's last impairment relayed and dropped (written when `restore` ends it)."""
    return lab_dir(name) / f"impairment-{host}.json"


def _impairments(host: LabHost) -> list:
    return _processes(host, "pdcluster.lab.link_impairment")


def _processes(host: LabHost, argument: str) -> list:
    """The host's processes with `argument` on their command line."""
    import psutil

    found = []
    for pid in netns_pids(host.netns):
        try:
            process = psutil.Process(pid)
            if argument in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def kill_redis(name: str) -> None:
    """The head's Redis registry gone at once (SIGKILL), and with it everything it held."""
    spec, _ = load(name)
    processes = _processes(spec.host("head"), "redis-server")
    for process in processes:
        process.kill()
    _wait_gone([process.pid for process in processes])


def start_redis(name: str) -> None:
    """The head's Redis registry (empty: it keeps nothing on disk)."""
    _start_redis(load(name)[0])


def crash(name: str, host: str) -> None:
    """Every process on the host killed at once, as in a power loss: its PID 1 dies, and the
    kernel kills the rest of its PID space with it. Its network stays (its cable is in)."""
    spec, anchors = load(name)
    spec.host(host)
    if host == "head":
        raise LabError("the head holds Ray's head; crash another host")
    try:
        os.kill(anchors[host], signal.SIGKILL)
    except ProcessLookupError:
        pass
    _wait_gone([anchors[host]])


def boot(name: str, host: str) -> None:
    """The host back after a crash: a fresh PID space, and its Ray node joining the head."""
    spec, anchors = load(name)
    lab_host = spec.host(host)
    _save(spec, {**anchors, host: _start_init(spec, lab_host)})
    if spec.ssh:
        _boot_ssh_host(spec, lab_host)
    if spec.ray:
        _start_ray_node(spec, lab_host)


def enter_network(name: str, host: str) -> str:
    """Move the calling thread into the host's network (its sockets from now on are the
    host's; threads it starts later inherit it). Returns the host's address."""
    spec, _ = load(name)
    lab_host = spec.host(host)
    with open(f"/run/netns/{lab_host.netns}") as netns:
        _set_network(netns.fileno(), f"{host}'s network")
    return lab_host.address


def own_network() -> int:
    """The calling thread's network, as a descriptor for `return_to_network`."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY)


def return_to_network(network: int) -> None:
    """Back to a network `own_network` kept (`down` kills every process in a lab host's)."""
    _set_network(network, "this process's own network")
    os.close(network)


def _set_network(fd: int, what: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        raise LabError(f"cannot enter {what}: {os.strerror(ctypes.get_errno())}")


def load(name: str) -> tuple[LabSpec, dict[str, int]]:
    path = _state_file(name)
    if not path.exists():
        raise LabError(f"no lab {name} is up (`pdcluster lab up` builds one)")
    state = json.loads(path.read_text())
    return LabSpec.model_validate(state["spec"]), state["anchors"]


def host_command(name: str, host: str, argv: list[str]) -> list[str]:
    """`argv` as run on the lab's host: in its network, PID, mount and UTS namespaces, from the
    current directory (the machine's files are every host's, as a shared home would be)."""
    spec, anchors = load(name)
    spec.host(host)  # a clear error for a host the lab lacks
    return ["nsenter", "--target", str(anchors[host]), "--net", "--pid", "--mount", "--uts", f"--wd={os.getcwd()}", "--", *argv]


def host_env() -> dict[str, str]:
    # The lab is a private network on one machine: its Ray runs without token authentication.
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


def netns_pids(netns: str) -> list[int]:
    """Every process in the network namespace (a lab host's, or its switch's)."""
    return [int(pid) for pid in subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()]


def existing_namespaces(name: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    return sorted(line.split()[0] for line in listed if line.split() and line.split()[0].startswith(f"{name}-"))


def _state_file(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def _save(spec: LabSpec, anchors: dict[str, int]) -> dict:
    """The lab's state (its spec, and each host's PID 1, which `host_command` enters), on disk."""
    state = {"spec": spec.model_dump(), "anchors": anchors}
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    _state_file(spec.name).write_text(json.dumps(state))
    return state


def lab_dir(name: str) -> Path:
    return Path("/tmp/pdcluster-lab") / name


def ray_dir(name: str) -> Path:
    """The lab's Ray sessions and logs, every host's under the session the head made."""
    return lab_dir(name) / "ray"


def _wait_gone(pids: list[int], timeout_s: float = 10) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)


def cluster_yaml(name: str) -> Path:
    """The lab's Ray cluster config (`ray up` it from the head), where the lab has sshd."""
    return lab_dir(name) / "cluster.yaml"


def _check_machine(spec: LabSpec) -> None:
    if os.geteuid() != 0:
        raise LabError("a lab needs root: it makes network, PID and mount namespaces")
    missing = [tool for tool in ("ip", "tc", "nsenter", "unshare", "mount") if shutil.which(tool) is None]
    if missing:
        raise LabError(f"a lab needs {', '.join(missing)} (iproute2, util-linux)")
    if spec.ssh:
        missing = [tool for tool in (lab_ssh.SSHD, "ssh", "ssh-keygen", "rsync") if shutil.which(tool) is None]
        if missing:
            raise LabError(f"a lab with --ssh needs {', '.join(missing)} (apt install openssh-server rsync)")
        if not lab_ssh.LOCAL_YAML.exists():
            raise LabError(f"a lab with --ssh runs `ray up` on the checkout's {lab_ssh.LOCAL_YAML}, which is missing")


def _make_ssh_hosts(spec: LabSpec) -> None:
    lab = lab_dir(spec.name)
    lab_ssh.make_keys(lab)
    for host in spec.hosts():
        lab_ssh.make_home(spec, lab, host)
        _boot_ssh_host(spec, host)
    cluster_yaml(spec.name).write_text(yaml.safe_dump(lab_ssh.cluster_config(spec, lab), sort_keys=False))


def _boot_ssh_host(spec: LabSpec, host: LabHost) -> None:
    for command in lab_ssh.host_boot_commands(lab_dir(spec.name), host):
        _on(spec, host, command)


def _run(command: list[str], env: dict | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        if "qdisc kind is unknown" in detail and "netem" in command:
            detail += " (this kernel has no netem: a link's delay cannot be emulated here; give a rate alone)"
        raise LabError(f"`{' '.join(command)}` failed: {detail}")
    return done.stdout


def _start_init(spec: LabSpec, host: LabHost) -> int:
    init = [sys.executable, "-m", "pdcluster.lab.host_init", host.name]
    unshare = ["unshare", "--pid", "--mount", "--uts", "--fork", "--mount-proc", "--propagation", "private", *init]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", host.netns, *unshare], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise LabError(f"host {host.name} did not start: {proc.communicate(timeout=10)[1].decode(errors='replace')[-2000:]}")
    import psutil

    (init_process,) = psutil.Process(proc.pid).children()  # unshare's child: PID 1 of the host
    return init_process.pid


def _start_ray(spec: LabSpec) -> None:
    head = spec.host("head")
    # The lab's own temp dir: its sessions never mix with a local Ray's in /tmp/ray.
    head_only = ["--port", str(RAY_PORT), "--include-dashboard=false", f"--temp-dir={ray_dir(spec.name)}"]
    _on(spec, head, [_ray(), "start", "--head", "--node-ip-address", head.address, *head_only, *_RAY_NODE])
    _start_redis(spec)
    for host in spec.hosts():
        if host.role != "head":
            _start_ray_node(spec, host)
    _wait_for_nodes(spec, len(spec.hosts()))


def _start_redis(spec: LabSpec) -> None:
    head = spec.host("head")
    redis = [
        "redis-server",
        "--bind",
        head.address,
        "--port",
        str(REDIS_PORT),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    subprocess.Popen(
        host_command(spec.name, head.name, redis), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _start_ray_node(spec: LabSpec, host: LabHost) -> None:
    address = f"{spec.host('head').address}:{RAY_PORT}"
    resources = json.dumps({host.resource: 1})
    _on(spec, host, [_ray(), "start", "--address", address, "--node-ip-address", host.address, "--resources", resources, *_RAY_NODE])


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _on(spec: LabSpec, host: LabHost, argv: list[str]) -> str:
    return _run(host_command(spec.name, host.name, argv), env=host_env())


def _wait_for_nodes(spec: LabSpec, count: int, timeout_s: float = 120) -> None:
    head = spec.host("head")
    probe = [
        sys.executable,
        "-c",
        f"import ray; ray.init(address='{head.address}:{RAY_PORT}', log_to_driver=False); print(len([n for n in ray.nodes() if n['Alive']]))",
    ]
    deadline = time.monotonic() + timeout_s
    while True:
        alive = _on(spec, head, probe).strip().splitlines()[-1]
        if int(alive) >= count:
            return
        if time.monotonic() > deadline:
            raise LabError(f"only {alive} of the lab's {count} Ray nodes joined in {timeout_s:.0f}s")
        time.sleep(1)
