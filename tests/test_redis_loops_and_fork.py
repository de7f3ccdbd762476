"""RedisBackend on a second event loop and in a forked child (issue 11, item 5).

A redis-py client belongs to the loop it first ran on; its sockets to the process that
opened them. These tests use one backend where a web app would: across ``asyncio.run``
calls, and on both sides of ``os.fork()``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import warnings

import pytest
from backend_contract import make_token
from redis.asyncio import Redis

from cl_tokens import BackendError
from cl_tokens.backends import RedisBackend

pytestmark = pytest.mark.redis


def _use(backend: RedisBackend, key: str) -> bool:
    """A full round: write, read, lock, renew, unlock, back-off. True if all worked."""

    async def main() -> bool:
        token = make_token()
        await backend.set(key, token)
        handle = await backend.acquire_lock(key, lease=5)
        assert handle is not None
        assert await backend.renew_lock(handle, lease=5) is True
        await backend.release_lock(handle)
        await backend.set_backoff(key, backend_time() + 30)
        assert await backend.get_backoff(key) is not None
        return await backend.get(key) == token

    return asyncio.run(main())


def backend_time() -> float:
    import time

    return time.time()


def test_asyncio_run_twice_with_one_backend(redis_url: str, redis_key_prefix: str) -> None:
    backend = RedisBackend(url=redis_url)
    key = redis_key_prefix + "k"
    # Before the fix, the second run failed with "RuntimeError: Event loop is closed".
    for _ in range(3):
        assert _use(backend, key) is True
    asyncio.run(backend.aclose())


def test_asyncio_run_twice_with_an_injected_client(redis_url: str, redis_key_prefix: str) -> None:
    client = Redis.from_url(redis_url)
    backend = RedisBackend(client)
    key = redis_key_prefix + "k"
    for _ in range(3):
        assert _use(backend, key) is True

    async def last_run() -> None:
        assert await backend.get(key) is not None
        await client.aclose()  # the caller's client, closed on the loop it last ran on

    asyncio.run(last_run())


async def test_an_injected_client_refuses_a_second_running_loop(
    redis_url: str, redis_key_prefix: str
) -> None:
    client = Redis.from_url(redis_url)
    backend = RedisBackend(client)
    key = redis_key_prefix + "k"
    try:
        assert await backend.get(key) is None  # bound to this (running) loop

        def in_another_thread() -> BaseException | None:
            async def main() -> None:
                await backend.get(key)

            try:
                asyncio.run(main())
            except BaseException as exc:
                return exc
            return None

        error = await asyncio.to_thread(in_another_thread)
        assert isinstance(error, BackendError)
        assert "one loop at a time" in str(error)
        assert await backend.get(key) is None  # still fine on its own loop
    finally:
        await client.aclose()


async def test_a_built_client_serves_two_running_loops(
    redis_url: str, redis_key_prefix: str
) -> None:
    backend = RedisBackend(url=redis_url)
    key = redis_key_prefix + "k"
    token = make_token()
    try:
        await backend.set(key, token)

        def in_another_thread() -> bool:
            async def main() -> bool:
                return await backend.get(key) == token

            return asyncio.run(main())

        assert await asyncio.to_thread(in_another_thread) is True
        assert await backend.get(key) == token
    finally:
        await backend.aclose()


def _fork_and_use(backend: RedisBackend, key: str) -> int:
    """Fork; the child uses ``backend`` on a new loop, collects garbage, and exits with
    0 if every call worked. Returns the child's exit status."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            code = 0 if _use(backend, key + ":child") else 2
            gc.collect()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("injected", [False, True], ids=["url", "injected"])
async def test_a_forked_child_uses_the_backend_and_leaves_the_parents_connection(
    redis_url: str, redis_key_prefix: str, injected: bool
) -> None:
    client = Redis.from_url(redis_url) if injected else None
    backend = RedisBackend(client) if client is not None else RedisBackend(url=redis_url)
    key = redis_key_prefix + "k"
    try:
        token = make_token()
        await backend.set(key, token)
        before = await backend.client.client_id()
        # Forked from inside the running loop, as gunicorn --preload or multiprocessing
        # may do: the child has a copy of this loop, its epoll instance and our socket.
        assert _fork_and_use(backend, key) == 0
        # The parent's pooled connection is the same one, and still works: the child
        # neither closed it nor unregistered it from the shared epoll instance.
        assert await backend.client.client_id() == before
        assert await backend.get(key) == token
        assert await backend.get(key + ":child") is not None  # what the child wrote
    finally:
        await backend.aclose()
        if client is not None:
            await client.aclose()


@pytest.mark.parametrize("topology", ["redis_cluster", "redis_sentinel"])
async def test_a_forked_child_rebuilds_cluster_and_sentinel_clients(
    request: pytest.FixtureRequest, topology: str
) -> None:
    group = request.getfixturevalue(topology)
    prefix = f"cl_tokens:test:fork-{os.getpid()}-{topology}:"
    backend = RedisBackend(url=group.url)
    try:
        token = make_token()
        await backend.set(prefix + "k", token)
        assert _fork_and_use(backend, prefix + "k") == 0
        assert await backend.get(prefix + "k") == token
        assert await backend.get(prefix + "k:child") is not None
    finally:
        await backend.aclose()
        group.delete_keys(prefix)
