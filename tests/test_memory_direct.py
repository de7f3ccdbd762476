"""The memory backend: awaited directly (no timeout task per call), its waiters woken
in-process by the write, the release or the delete."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from backend_contract import make_token

import cl_tokens._shared as shared_module
from cl_tokens import Token, TokenManager
from cl_tokens.backends import LockHandle, MemoryBackend
from cl_tokens.testing import FakeAuthServer


class CountingWithin:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._within = shared_module.within
        monkeypatch.setattr(shared_module, "within", self)

    def __call__(self, call: Any, timeout: float) -> Any:
        self.calls += 1
        return self._within(call, timeout)


class Subclass(MemoryBackend):
    """Inherits ``blocking = False`` without saying it: it might block."""

    async def get(self, key: str) -> Token | None:
        return await super().get(key)


async def test_the_memory_backend_is_awaited_without_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    within = CountingWithin(monkeypatch)
    async with (
        FakeAuthServer() as server,
        TokenManager(server.client_id, server.client_secret, auth_url=server.url) as manager,
    ):
        await manager.header()
        assert within.calls == 0


async def test_a_subclass_that_does_not_say_it_never_blocks_gets_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    within = CountingWithin(monkeypatch)
    async with (
        FakeAuthServer() as server,
        TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, backend=Subclass()
        ) as manager,
    ):
        await manager.header()
        assert within.calls >= 2  # get-or-lock, set-and-release


class CountingGets(MemoryBackend):
    blocking = False

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def get(self, key: str) -> Token | None:
        self.gets += 1
        return await super().get(key)


async def test_a_waiter_is_woken_by_the_write_not_by_polling() -> None:
    backend = CountingGets()
    handle = await backend.get_or_lock("k", lease=30)
    assert isinstance(handle, LockHandle)
    backend.gets = 0
    waiter = asyncio.create_task(backend.wait_for("k", timeout=30, poll=0.001))
    await asyncio.sleep(0.2)  # 200 polls' worth
    assert backend.gets == 1
    token = make_token()
    await backend.set_and_release("k", token, handle)
    assert await waiter == token
    assert backend.gets == 2  # the read after the wake-up


async def test_a_release_without_a_write_ends_the_wait() -> None:
    backend = CountingGets()
    handle = await backend.get_or_lock("k", lease=30)
    assert isinstance(handle, LockHandle)
    waiter = asyncio.create_task(backend.wait_for("k", timeout=30))
    await asyncio.sleep(0.05)
    await backend.release_lock(handle)
    assert await asyncio.wait_for(waiter, 5) is None
    assert isinstance(await backend.get_or_lock("k", lease=30), LockHandle)


async def test_a_delete_wakes_a_waiter_that_keeps_waiting_for_a_new_token() -> None:
    backend = CountingGets()
    old = make_token()
    await backend.set("k", old)
    handle = await backend.get_or_lock("k", lease=30, refuse=old.access_token)
    assert isinstance(handle, LockHandle)
    waiter = asyncio.create_task(backend.wait_for("k", timeout=30, refuse=old.access_token))
    await asyncio.sleep(0.05)
    await backend.delete("k", old.access_token)
    await asyncio.sleep(0.05)
    assert not waiter.done()  # the lock is still held: the holder will write
    new = make_token()
    await backend.set_and_release("k", new, handle)
    assert await asyncio.wait_for(waiter, 5) == new
