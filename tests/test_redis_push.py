"""The Redis cold path in two round trips, and waiters woken by the writer's publish."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from backend_contract import make_token
from redis.asyncio import Redis
from redis_support import RedisServer

from cl_tokens import BackendError, TokenManager
from cl_tokens.backends import LockHandle, RedisBackend
from cl_tokens.backends._redis import _listener
from cl_tokens.testing import FakeAuthServer

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    async with RedisBackend(url=redis_url) as backend:
        yield backend


class CountingReads:
    """Counts the reads a waiter makes of its key (each poll is one)."""

    def __init__(self, backend: RedisBackend) -> None:
        self.calls = 0
        self._peek = backend._peek
        backend._peek = self  # type: ignore[method-assign]

    async def __call__(self, key: str, refuse: str | None) -> Any:
        self.calls += 1
        return await self._peek(key, refuse)


async def numpat(url: str) -> int:
    async with Redis.from_url(url) as client:
        return int(await client.pubsub_numpat())


async def test_a_cold_header_is_two_round_trips(redis_url: str, redis_key_prefix: str) -> None:
    async with (
        FakeAuthServer() as server,
        TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, backend=redis_url
        ) as manager,
    ):
        await manager.header("market:code:warm")  # connects and loads the scripts
        client = manager.backend.client  # type: ignore[attr-defined]
        sent: list[str] = []
        execute = client.execute_command

        async def counted(*args: Any, **options: Any) -> Any:
            sent.append(str(args[0]))
            return await execute(*args, **options)

        client.execute_command = counted
        await manager.header("market:code:cold")
        assert sent == ["EVALSHA", "EVALSHA"]  # get-or-lock, then set+release+publish
        sent.clear()
        await manager.header("market:code:cold")
        assert sent == []  # warm: no round trip at all
        assert server.token_requests == 2


async def test_a_waiter_in_another_process_is_woken_by_the_publish(
    redis_url: str, redis_key_prefix: str, backend: RedisBackend
) -> None:
    key = redis_key_prefix + "k"
    waiter = textwrap.dedent(
        f"""
        import asyncio, json
        from cl_tokens.backends import RedisBackend

        async def main():
            async with RedisBackend(url={redis_url!r}) as backend:
                gets = 0
                read = backend._peek
                async def counted(key, refuse):
                    nonlocal gets
                    gets += 1
                    return await read(key, refuse)
                backend._peek = counted
                token = await backend.wait_for({key!r}, timeout=30, poll=0.5)
                print(json.dumps({{"token": token and token.access_token, "gets": gets}}))

        asyncio.run(main())
        """
    )
    before = await numpat(redis_url)
    handle = await backend.get_or_lock(key, lease=30)
    assert isinstance(handle, LockHandle)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", waiter, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while await numpat(redis_url) <= before:  # the child has subscribed
            assert time.monotonic() < deadline, "the waiter never subscribed"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # into its wait, past its first read
        token = make_token()
        await backend.set_and_release(key, token, handle)
        out, _ = await asyncio.wait_for(child.communicate(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    result = json.loads(out)
    assert result["token"] == token.access_token
    # One read before the wait, none after: the token came in the message. Polling
    # (every 0.5 s) or the safety re-read (every 1 s) would have read again.
    assert result["gets"] == 1


async def test_a_write_between_the_subscription_and_the_read_still_wakes(
    redis_url: str, redis_key_prefix: str, backend: RedisBackend
) -> None:
    key = redis_key_prefix + "k"
    token = make_token()
    async with RedisBackend(url=redis_url) as writer:
        handle = await writer.get_or_lock(key, lease=30)
        assert isinstance(handle, LockHandle)
        gets = 0
        read = backend._peek

        async def read_then_write(key: str, refuse: str | None) -> Any:
            # The read misses; the holder writes and publishes before the waiter waits.
            nonlocal gets
            gets += 1
            seen = await read(key, refuse)
            if gets == 1:
                assert seen[0] is None
                await writer.set_and_release(key, token, handle)
            return seen

        backend._peek = read_then_write  # type: ignore[method-assign]
        assert await backend.wait_for(key, timeout=30) == token
        assert gets == 1  # woken by the message, not by a second read


async def test_one_pubsub_connection_serves_every_waiter(
    redis_url: str, redis_key_prefix: str, backend: RedisBackend
) -> None:
    before = await numpat(redis_url)
    keys = [f"{redis_key_prefix}k{i % 5}" for i in range(60)]
    handles = {key: await backend.get_or_lock(key, lease=30) for key in set(keys)}
    waiters = [asyncio.create_task(backend.wait_for(key, timeout=30)) for key in keys]
    await asyncio.sleep(0.3)
    assert await numpat(redis_url) == before + 1
    async with Redis.from_url(redis_url) as client:
        clients = await client.client_list()
    # One connection per client of ours at most: commands, and the one pub/sub.
    assert sum(1 for c in clients if int(c.get("psub", 0)) > 0) >= 1
    tokens = {key: make_token() for key in handles}
    async with RedisBackend(url=redis_url) as writer:
        for key, handle in handles.items():
            assert isinstance(handle, LockHandle)
            await writer.set_and_release(key, tokens[key], handle)
    assert await asyncio.gather(*waiters) == [tokens[key] for key in keys]
    bound = await backend._clients.use()
    assert _listener(bound).connections == 1
    await backend.aclose()
    assert await numpat(redis_url) == before  # aclose closed it


async def test_a_holder_that_fails_wakes_its_waiters_at_once(
    redis_url: str, redis_key_prefix: str, backend: RedisBackend
) -> None:
    key = redis_key_prefix + "k"
    async with RedisBackend(url=redis_url) as holder:
        handle = await holder.get_or_lock(key, lease=30)
        assert isinstance(handle, LockHandle)
        gets = CountingReads(backend)
        waiter = asyncio.create_task(backend.wait_for(key, timeout=30, poll=5))
        while gets.calls == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        await holder.release_lock(handle)  # its fetch failed: no token
        assert await waiter is None  # take the lock again now, not after 30 s
        assert gets.calls == 1
        taken = await backend.get_or_lock(key, lease=30)
        assert isinstance(taken, LockHandle)
        await backend.release_lock(taken)


async def test_waiters_poll_when_pubsub_fails(
    redis_url: str, redis_key_prefix: str, backend: RedisBackend
) -> None:
    key = redis_key_prefix + "k"
    bound = await backend._clients.use()

    def no_pubsub() -> Any:
        raise ConnectionError("pub/sub refused")

    bound.client.pubsub = no_pubsub
    gets = CountingReads(backend)
    token = make_token()
    handle = await backend.get_or_lock(key, lease=30)
    assert isinstance(handle, LockHandle)

    async def write_soon() -> None:
        await asyncio.sleep(0.5)
        await backend.set(key, token)  # a plain write: no publish
        await backend.release_lock(handle)

    writer = asyncio.create_task(write_soon())
    assert await backend.wait_for(key, timeout=30, poll=0.1) == token
    await writer
    assert gets.calls >= 3  # it polled


async def test_waits_survive_a_new_event_loop(redis_url: str, redis_key_prefix: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from cl_tokens.backends import RedisBackend
        from cl_tokens.testing.backend_contract import make_token

        backend = RedisBackend(url={redis_url!r})

        async def once(n):
            key = {redis_key_prefix!r} + str(n)
            handle = await backend.get_or_lock(key, lease=30)
            token = make_token()
            async def write():
                await asyncio.sleep(0.2)
                await backend.set_and_release(key, token, handle)
            task = asyncio.create_task(write())
            assert await backend.wait_for(key, timeout=30) == token
            await task

        asyncio.run(once(1))
        asyncio.run(once(2))
        asyncio.run(backend.aclose())
        print("ok")
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "ignore",
        "-c",
        script,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()
    assert out.decode().strip() == "ok"


async def test_a_dead_redis_is_a_backend_error_while_waiting() -> None:
    async with RedisBackend(url="redis://127.0.0.1:1/0", socket_timeout=0.5) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.wait_for("cl_tokens:v2:x", timeout=1)
        assert caught.value.__cause__ is not None
        with pytest.raises(BackendError):
            await backend.get_or_lock("cl_tokens:v2:x", lease=1)


async def test_a_user_without_channel_rights_still_writes_and_its_waiters_poll(
    redis_server: RedisServer,
) -> None:
    async with Redis.from_url(redis_server.url) as admin:
        # Since Redis 7 a new user gets no channels unless granted (resetchannels).
        await admin.execute_command(
            "ACL", "SETUSER", "tokens", "on", ">pw", "~*", "+@all", "resetchannels"
        )
    url = f"redis://tokens:pw@127.0.0.1:{redis_server.port}/0"
    async with RedisBackend(url=url) as backend, RedisBackend(url=url) as writer:
        handle = await writer.get_or_lock("k", lease=30)
        assert isinstance(handle, LockHandle)
        token = make_token()

        async def write_soon() -> None:
            await asyncio.sleep(0.3)
            await writer.set_and_release("k", token, handle)

        task = asyncio.create_task(write_soon())
        assert await backend.wait_for("k", timeout=10, poll=0.1) == token
        await task
        assert await writer.get("k") == token
        again = await writer.get_or_lock("k", lease=30, refuse=token.access_token)
        assert isinstance(again, LockHandle)  # released
        await writer.release_lock(again)  # a release's publish is refused too: no error


async def test_a_forked_child_waits_on_its_own_connection_and_the_parent_keeps_its_own(
    redis_url: str, redis_key_prefix: str
) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os
        from cl_tokens.backends import RedisBackend
        from cl_tokens.testing.backend_contract import make_token

        backend = RedisBackend(url={redis_url!r})
        loop = asyncio.new_event_loop()

        async def once(name):
            key = {redis_key_prefix!r} + name
            writer = RedisBackend(url={redis_url!r})
            handle = await writer.get_or_lock(key, lease=30)
            token = make_token()
            async def write():
                await asyncio.sleep(0.2)
                await writer.set_and_release(key, token, handle)
            task = asyncio.create_task(write())
            assert await backend.wait_for(key, timeout=30) == token
            await task
            await writer.aclose()

        loop.run_until_complete(once("parent-1"))  # the parent's listener is open
        pid = os.fork()
        if pid == 0:
            asyncio.run(once("child"))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        reads = 0
        peek = backend._peek
        async def counted(key, refuse):
            global reads
            reads += 1
            return await peek(key, refuse)
        backend._peek = counted
        loop.run_until_complete(once("parent-2"))
        assert reads == 1, reads  # woken by push: its pub/sub connection survived the child
        loop.run_until_complete(backend.aclose())
        print("ok")
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "ignore",
        "-c",
        script,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()
    assert out.decode().strip() == "ok"
