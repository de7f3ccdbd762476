"""Linux network namespaces as stand-in hosts: probe, build, cut off, tear down.

One bridge in the root namespace joins a veth from each namespace, as one switch joins
the hosts of a subnet. The bridge has an address of its own, so a server in the
benchmark's own process (the fake token server) is reachable from every namespace, as
Commerce Layer is from every host. Cutting a host is ``ip link set <its veth> down`` on
the bridge side: its packets are dropped, as when a switch port or a cable fails, and
its sockets find out only by timing out (nothing is refused).

Every name starts with ``cltok-<pid>-`` (namespaces) or ``ck<pid>`` (interfaces, at
most 15 characters), so two runs never collide and leftovers are easy to spot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Topology", "topology", "unavailable"]


def unavailable() -> str | None:
    """None when namespaces can be made here, else why not (the benchmark is skipped)."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not on PATH"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("redis-server") is None:
        return "no redis-server binary on PATH"
    probe = f"cltok-{os.getpid()}-probe"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe)
    return None


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _must(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def _free_subnet() -> str:
    """A 10.231.x/24 that no interface or route here uses yet."""
    used = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    start = os.getpid() % 250
    for offset in range(250):
        candidate = f"10.231.{(start + offset) % 250 + 1}"
        if f"{candidate}." not in used:
            return candidate
    raise RuntimeError("no free 10.231.x.0/24 subnet for the benchmark's namespaces")


@dataclass
class Topology:
    """The namespaces made by ``topology()``: one per role, each with one address."""

    prefix: str
    tag: str  # ``ck<pid>``: the interfaces' prefix
    subnet: str
    gateway: str  # the bridge's address, in the root namespace
    addresses: dict[str, str] = field(default_factory=dict)
    veths: dict[str, str] = field(default_factory=dict)  # role -> bridge-side veth

    def namespace(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def exec_args(self, role: str) -> list[str]:
        """The command prefix that runs a program inside ``role``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(role)]

    async def set_link(self, role: str, *, up: bool) -> None:
        """Connect or cut off ``role`` (off the event loop's thread: the token server
        runs on it and must keep answering the other hosts)."""
        proc = await asyncio.create_subprocess_exec(
            "ip", "link", "set", self.veths[role], "up" if up else "down",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"could not set {self.veths[role]} {up=}: {err.decode().strip()}")


@contextmanager
def topology(roles: Sequence[str]) -> Iterator[Topology]:
    """A bridge and one namespace per role on it; everything is removed on exit, even
    after a failure halfway through building it."""
    pid = os.getpid()
    subnet = _free_subnet()
    topo = Topology(f"cltok-{pid}-", f"ck{pid}", subnet, f"{subnet}.1")
    bridge = f"{topo.tag}b"
    try:
        _must("link", "add", bridge, "type", "bridge")
        _must("addr", "add", f"{topo.gateway}/24", "dev", bridge)
        _must("link", "set", bridge, "up")
        for i, role in enumerate(roles, start=1):
            ns = topo.namespace(role)
            outer, inner = f"{topo.tag}{i}", f"{topo.tag}{i}p"
            address = f"{subnet}.{i + 1}"
            _must("netns", "add", ns)
            topo.addresses[role] = address
            _must("link", "add", outer, "type", "veth", "peer", "name", inner)
            topo.veths[role] = outer
            _must("link", "set", inner, "netns", ns)
            _must("-n", ns, "link", "set", inner, "name", "eth0")
            _must("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _must("-n", ns, "link", "set", "eth0", "up")
            _must("-n", ns, "link", "set", "lo", "up")
            _must("link", "set", outer, "master", bridge)
            _must("link", "set", outer, "up")
        yield topo
    finally:
        for role in topo.addresses:
            _ip("netns", "del", topo.namespace(role))
        for veth in topo.veths.values():
            _ip("link", "del", veth)  # usually gone with its peer's namespace already
        _ip("link", "del", bridge)
