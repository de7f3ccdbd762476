"""RedisBackend against a real Redis Cluster and a real Sentinel group (issue 12).

The contract suite runs on both (tests/test_backends_contract.py); these are the
topology-specific cases: a fresh cluster client under a stampede, the wrong URL for a
cluster, dead seeds, injected Sentinel clients.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from backend_contract import make_token
from redis.asyncio import Redis
from redis.asyncio import RedisCluster as ClusterClient
from redis.asyncio.sentinel import Sentinel
from redis_topologies import SERVICE, RedisCluster, RedisSentinelGroup

from cl_tokens import BackendError
from cl_tokens.backends import RedisBackend, backend_from_url

pytestmark = pytest.mark.redis


@pytest.fixture
def prefix(redis_cluster: RedisCluster) -> str:
    return f"cl_tokens:test:{uuid.uuid4().hex}:"


async def _stampede(backend: RedisBackend, prefix: str, scopes: int, callers: int) -> int:
    """``callers`` coroutines per scope take the lock, read, write, release; returns
    how many times a lock was held by two at once (must be 0)."""
    inside: dict[str, int] = {}
    overlaps = 0

    async def caller(key: str) -> None:
        nonlocal overlaps
        async with backend.lock(key, lease=10, timeout=30, poll=0.005):
            inside[key] = inside.get(key, 0) + 1
            overlaps += inside[key] > 1
            if await backend.get(key) is None:
                await backend.set(key, make_token())
            inside[key] -= 1

    keys = [f"{prefix}scope-{i}" for i in range(scopes)]
    await asyncio.gather(*(caller(k) for k in keys for _ in range(callers)))
    return overlaps


async def test_an_uninitialized_injected_cluster_client_serves_a_stampede(
    redis_cluster: RedisCluster,
    prefix: str,
) -> None:
    # A fresh RedisCluster used by many coroutines at once raised AttributeError
    # ('NoneType' object has no attribute 'writelines') before the backend initialized
    # it once, under single flight, before its first command.
    client = ClusterClient(host="127.0.0.1", port=redis_cluster.ports[0])
    try:
        backend = RedisBackend(client)
        assert await _stampede(backend, prefix, scopes=12, callers=20) == 0
    finally:
        await client.aclose()
        redis_cluster.delete_keys(prefix)


async def test_a_cluster_url_with_two_seeds_serves_a_stampede(
    redis_cluster: RedisCluster,
    prefix: str,
) -> None:
    async with RedisBackend(url=redis_cluster.url) as backend:
        assert await _stampede(backend, prefix, scopes=12, callers=20) == 0
        keys = [f"{{{prefix}scope-3}}", f"{{{prefix}scope-3}}:lock"]
        client = backend.client
        assert isinstance(client, ClusterClient)
        slots = {await client.cluster_keyslot(k) for k in keys}
        assert len(slots) == 1
    redis_cluster.delete_keys(prefix)


async def test_a_dead_first_seed_is_skipped(
    redis_cluster: RedisCluster,
    prefix: str,
) -> None:
    url = f"redis+cluster://127.0.0.1:1,127.0.0.1:{redis_cluster.ports[2]}"
    async with backend_from_url(url) as backend:
        await backend.set(prefix + "k", make_token())
        assert await backend.get(prefix + "k") is not None
    redis_cluster.delete_keys(prefix)


async def test_a_plain_redis_url_to_a_cluster_node_names_redis_cluster(
    redis_cluster: RedisCluster,
    prefix: str,
) -> None:
    url = f"redis://127.0.0.1:{redis_cluster.ports[0]}/0"
    async with RedisBackend(url=url) as backend:
        for call in (backend.get(prefix + "k"), backend.acquire_lock(prefix + "k", lease=1)):
            with pytest.raises(BackendError, match=r"redis\+cluster://") as caught:
                await call
            assert "Cluster node" in str(caught.value)


async def test_a_moved_reply_names_redis_cluster(
    redis_cluster: RedisCluster,
    prefix: str,
) -> None:
    # Where INFO is denied (some managed services), the MOVED reply still tells.
    client = Redis(port=redis_cluster.ports[0])

    async def no_info(section: str) -> dict[str, str]:
        from redis.exceptions import ResponseError

        raise ResponseError("NOPERM this user has no permissions to run the 'info' command")

    client.info = no_info  # type: ignore[method-assign]
    try:
        backend = RedisBackend(client)
        errors = []
        for i in range(20):  # some keys live on this node; most do not
            try:
                await backend.get(f"{prefix}{i}")
            except BackendError as exc:
                errors.append(str(exc))
        assert errors
        assert all("redis+cluster://" in text for text in errors)
    finally:
        await client.aclose()
        redis_cluster.delete_keys(prefix)


async def test_an_injected_sentinel_client_follows_the_service(
    redis_sentinel: RedisSentinelGroup,
) -> None:
    sentinel = Sentinel([("127.0.0.1", p) for p in redis_sentinel.sentinels], socket_timeout=1)
    client = sentinel.master_for(SERVICE, socket_timeout=1)
    key = f"cl_tokens:test:{uuid.uuid4().hex}:k"
    try:
        backend = RedisBackend(client)
        token = make_token()
        await backend.set(key, token)
        assert await backend.get(key) == token
        await backend.set_backoff(key, time.time() + 10)
        assert await backend.get_backoff(key) is not None
    finally:
        await client.aclose()
        for each in sentinel.sentinels:
            await each.aclose()
        redis_sentinel.delete_keys(key.rsplit(":", 1)[0])


async def test_a_sentinel_url_for_an_unknown_service_is_a_backend_error(
    redis_sentinel: RedisSentinelGroup,
) -> None:
    hosts = ",".join(f"127.0.0.1:{p}" for p in redis_sentinel.sentinels)
    async with backend_from_url(f"redis+sentinel://{hosts}/no-such-service") as backend:
        with pytest.raises(BackendError, match="MasterNotFoundError"):
            await backend.get("k")


async def test_a_preparation_outlives_a_caller_that_gives_up(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    # The manager bounds each backend call; a Cluster client's first initialize may
    # take longer under load. A caller that times out must not restart it from scratch.
    async with RedisBackend(url=redis_cluster.url) as backend:
        client = backend.client
        assert isinstance(client, ClusterClient)
        real_initialize = client.initialize
        calls = 0

        async def slow_initialize(*args: object, **kwargs: object) -> ClusterClient:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.3)
            return await real_initialize()

        client.initialize = slow_initialize  # type: ignore[method-assign]
        for _ in range(3):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(backend.get(prefix + "k"), 0.05)
        await backend.connect()
        assert calls == 1
        await backend.set(prefix + "k", make_token())
        assert await backend.get(prefix + "k") is not None
    redis_cluster.delete_keys(prefix)
