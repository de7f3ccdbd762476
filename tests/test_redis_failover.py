"""A failover while a lock is held: the ghost lock costs at most one lease (issue 12).

Redis replicates the lock (``SET ... PX`` reaches the replica as an absolute expiry),
so the promoted replica holds a lock that nobody will release. With a short lease
that the holder renews, a waiter gets it back at most one lease after the failover,
instead of after the whole lock wait. Each test builds its own topology, as it
damages it, and prints what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import pytest
from redis_topologies import RedisCluster, RedisSentinelGroup, _binary, _sync_client, _wait

from cl_tokens import BackendError
from cl_tokens.backends import RedisBackend

pytestmark = [pytest.mark.redis, pytest.mark.slow]

LEASE = 3.0
# A Cluster election (node timeout 1 s) takes 2-3 s here: a longer lease lets the test
# see the ghost lock on the promoted replica.
CLUSTER_LEASE = 4.5
KEY = "cl_tokens:v2:" + "f0" * 20


@dataclass
class Waited:
    service_back: float  # seconds from the fault to the first answer from Redis
    acquired: float  # seconds from the fault to holding the lock
    errors: int  # attempts that failed during the failover
    refused: int  # attempts answered "held by another" (the ghost lock)


async def _wait_for_lock(
    backend: RedisBackend, fault_at: float, limit: float, lease: float = LEASE
) -> Waited:
    errors = refused = 0
    service_back = None
    while time.monotonic() - fault_at < limit:
        try:
            handle = await backend.acquire_lock(KEY, lease=lease)
        except BackendError:
            errors += 1
            await asyncio.sleep(0.05)
            continue
        now = time.monotonic() - fault_at
        if service_back is None:
            service_back = now
        if handle is not None:
            await backend.release_lock(handle)
            return Waited(service_back, now, errors, refused)
        refused += 1
        await asyncio.sleep(0.02)
    raise AssertionError(f"no lock {limit:g} s after the fault ({errors} errors, {refused} held)")


def _lock_on(port: int, *, replica: bool) -> bool:
    client = _sync_client(port)
    if replica:
        # A Sentinel-managed replica serves reads without READONLY (and refuses it).
        with contextlib.suppress(Exception):
            client.execute_command("READONLY")  # type: ignore[attr-defined]
    return bool(client.exists("{" + KEY + "}:lock"))  # type: ignore[attr-defined]


async def test_killing_a_cluster_master_under_a_held_lock_costs_at_most_one_lease() -> None:
    cluster = RedisCluster(_binary("redis-server"), _binary("redis-cli"), node_timeout_ms=1000)
    try:
        cluster.start()
        async with RedisBackend(url=cluster.url, socket_timeout=0.5) as backend:
            holder = await backend.acquire_lock(KEY, lease=CLUSTER_LEASE)
            assert holder is not None
            client = backend.client
            master = client.get_node_from_key("{" + KEY + "}:lock").port  # type: ignore[union-attr]
            replica = cluster.replica_of(master)
            _wait("the lock on the replica", lambda: _lock_on(replica, replica=True), 5)
            # The holder dies with the master: nobody will release or renew the lock.
            fault_at = time.monotonic()
            cluster.kill(master)
            waited = await _wait_for_lock(backend, fault_at, limit=30, lease=CLUSTER_LEASE)
        print(
            f"\ncluster master killed: Redis answered again after {waited.service_back:.2f} s, "
            f"lock taken after {waited.acquired:.2f} s (lease {CLUSTER_LEASE:g} s; "
            f"{waited.errors} failed and {waited.refused} refused attempts)"
        )
        if waited.service_back < CLUSTER_LEASE - 0.3:  # an election may outlast the lease
            assert waited.refused > 0, "the promoted replica should hold the ghost lock"
        assert waited.acquired - waited.service_back <= CLUSTER_LEASE + 1.5
    finally:
        cluster.close()


async def test_a_sentinel_failover_under_a_held_lock_costs_at_most_one_lease() -> None:
    group = RedisSentinelGroup(_binary("redis-server"))
    try:
        group.start()
        group.wait_healthy(failover_ready=True)
        async with RedisBackend(url=group.url, socket_timeout=0.5) as backend:
            holder = await backend.acquire_lock(KEY, lease=LEASE)
            assert holder is not None
            first = group.primary_port()
            replica = group.replica if first == group.primary else group.primary
            _wait("the lock on the replica", lambda: _lock_on(replica, replica=True), 5)
            # The holder is gone (or its release went to the old primary and was lost
            # in the resync): the promoted replica holds the lock.
            fault_at = time.monotonic()
            group.failover()
            await asyncio.to_thread(
                _wait, "the replica's promotion", lambda: group.primary_port() != first, 10
            )
            waited = await _wait_for_lock(backend, fault_at, limit=30)
            assert group.primary_port() == replica
        print(
            f"\nSENTINEL failover: promoted, answering after {waited.service_back:.2f} s; "
            f"lock taken after {waited.acquired:.2f} s (lease {LEASE:g} s; "
            f"{waited.errors} failed and {waited.refused} refused attempts)"
        )
        assert waited.refused > 0, "the promoted replica should have held the ghost lock"
        assert waited.acquired - waited.service_back <= LEASE + 1.5
    finally:
        group.close()
