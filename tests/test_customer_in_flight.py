"""The in-flight mark of a customer's renewal: a refresh token, once sent, is never sent
again, by any process.

Each test sets up the state one failure leaves (a holder whose lock was lost while its
request ran, a holder that died before or after sending, a store that took a write late)
with two managers sharing one store, and counts refresh requests and reuses at the fake
server, whose refresh tokens are single-use.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from cl_tokens import BackendError, LoginRequiredError, Token, TokenEndpointError, TokenManager
from cl_tokens.backends import LockHandle, MemoryBackend
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"
# Short figures, so that waiting out a mark takes a second, not fourteen.
FAST = {"attempt_timeout": 0.6, "backend_timeout": 0.2, "fetch_deadline": 2.0}


def manager_for(server: FakeAuthServer, backend: Any, **options: Any) -> TokenManager:
    return TokenManager(
        server.client_id, SECRET, auth_url=server.url, backend=backend, **{**FAST, **options}
    )


def key_of(manager: TokenManager, owner: str) -> str:
    return manager._resolve((None, owner))[0]


async def stored(manager: TokenManager, owner: str) -> Token | None:
    return await manager._shared.read(key_of(manager, owner))


async def logged_in(server: FakeAuthServer, manager: TokenManager) -> tuple[str, Token]:
    owner = server.customers.add("ann@example.com", "pw-123456")
    return owner, await manager.login("ann@example.com", "pw-123456")


class Shared(MemoryBackend):
    """Another process's view of ``inner``: the same entries and locks."""

    def __init__(self, inner: MemoryBackend) -> None:
        super().__init__()
        self.inner = inner

    async def get(self, key: str) -> Token | None:
        return await self.inner.get(key)

    async def set(self, key: str, token: Token) -> None:
        await self.inner.set(key, token)

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        return await self.inner.delete(key, access_token)


class LostLock(Shared):
    """A store whose lock this process believes it holds while another process may take
    it too: what a failover, or a lease that ran out under a stalled loop, looks like."""

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        return LockHandle(key, "not-really-held")

    async def renew_lock(self, handle: LockHandle, *, lease: float) -> bool:
        return True

    async def release_lock(self, handle: LockHandle) -> None:
        return None


async def test_a_second_holder_waits_for_the_answer_of_a_holder_whose_lock_was_lost() -> None:
    """A's lock was lost while its refresh ran; B takes the lock, finds A's mark, and
    waits for A's answer instead of sending the token again or logging the customer out."""
    async with FakeAuthServer(client_secret=SECRET) as server:
        store = MemoryBackend()
        a = manager_for(server, LostLock(store))  # A's locks are not really held
        b = manager_for(server, store)
        try:
            owner, first = await logged_in(server, a)
            assert (await b.token(customer=owner)).access_token == first.access_token
            server.delay_next(1, 0.4)  # A's refresh request takes a while
            await a.invalidate(first.access_token, customer=owner)
            renewing = asyncio.ensure_future(a.token(customer=owner))
            while (await stored(b, owner)).refresh_sent is None:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
            await b.invalidate(first.access_token, customer=owner)
            from_b = await b.token(customer=owner)
            from_a = await renewing
        finally:
            await a.aclose()
            await b.aclose()
        assert from_b.access_token == from_a.access_token != first.access_token
        assert server.customers.refresh_requests == 1
        assert server.customers.refresh_reuses == 0


async def test_a_holder_that_died_after_sending_logs_the_customer_out_without_a_reuse() -> None:
    """The state a holder killed between sending and writing leaves: the token is spent
    at the server and marked in the store. The next holder waits out the mark, then
    raises LoginRequiredError; it never sends the spent token (no reuse)."""
    async with FakeAuthServer(client_secret=SECRET) as server:
        store = MemoryBackend()
        a = manager_for(server, store)
        b = manager_for(server, store)
        try:
            owner, first = await logged_in(server, a)
            assert first.refresh_token is not None
            sent_at = time.time()
            await a._shared.write(key_of(a, owner), replace(first, refresh_sent=sent_at))
            async with aiohttp.ClientSession() as session:  # the dead holder's request
                body = {
                    "grant_type": "refresh_token",
                    "refresh_token": first.refresh_token,
                    "client_id": server.client_id,
                    "client_secret": SECRET,
                }
                async with session.post(server.url, json=body) as answer:
                    assert answer.status == 200
            await b.invalidate(first.access_token, customer=owner)
            with pytest.raises(LoginRequiredError) as caught:
                await b.token(customer=owner)
            waited = time.time() - sent_at
        finally:
            await a.aclose()
            await b.aclose()
        assert caught.value.owner_id == owner
        assert first.refresh_token not in str(caught.value)
        assert waited >= FAST["attempt_timeout"] + 2 * FAST["backend_timeout"]
        assert server.customers.refresh_requests == 1  # the dead holder's only
        assert server.customers.refresh_reuses == 0


async def test_a_holder_that_died_holding_the_lock_before_sending_delays_nobody_for_long() -> None:
    """A holder killed before it marked the pair left only its lock: once the lock's lease
    runs out, the next holder sends the (unspent) token once."""
    async with FakeAuthServer(client_secret=SECRET) as server:
        store = MemoryBackend()
        a = manager_for(server, store)
        b = manager_for(server, store, lock_lease=0.45)
        try:
            owner, first = await logged_in(server, a)
            dead = await store.acquire_lock(key_of(a, owner), lease=0.6)
            assert dead is not None
            await b.invalidate(first.access_token, customer=owner)
            renewed = await b.token(customer=owner)
        finally:
            await a.aclose()
            await b.aclose()
        assert renewed.access_token != first.access_token
        assert server.customers.refresh_requests == 1
        assert server.customers.refresh_reuses == 0


async def test_a_refresh_the_server_answered_with_503_is_unmarked_and_sent_once_later() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        store = MemoryBackend()
        a = manager_for(server, store)
        b = manager_for(server, store)
        try:
            owner, first = await logged_in(server, a)
            server.fail_next(1, 503)
            await a.invalidate(first.access_token, customer=owner)
            with pytest.raises(TokenEndpointError) as caught:
                await a.token(customer=owner)
            assert caught.value.status == 503
            kept = await stored(a, owner)
            assert kept is not None
            assert kept.refresh_sent is None
            assert kept.refresh_token == first.refresh_token
            await asyncio.sleep(1.2)  # the fleet's back-off after a 503
            await b.invalidate(first.access_token, customer=owner)
            renewed = await b.token(customer=owner)
        finally:
            await a.aclose()
            await b.aclose()
        assert renewed.access_token != first.access_token
        assert server.customers.refresh_requests == 1  # the 503 came before the grant
        assert server.customers.refresh_reuses == 0


class NoLocks(MemoryBackend):
    """A store whose lock calls fail (a failover): reads and writes still work."""

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        raise BackendError("lock service down")


async def test_no_refresh_token_is_sent_without_the_lock() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        manager = manager_for(server, NoLocks())
        try:
            owner, first = await logged_in(server, manager)
            await manager.invalidate(first.access_token, customer=owner)
            with pytest.raises(BackendError):
                await manager.token(customer=owner)
        finally:
            await manager.aclose()
        assert server.customers.refresh_requests == 0


class LateWrites(MemoryBackend):
    """Applies the first write of a renewed pair, then answers too late (a slow store);
    a second write of that pair (a background retry) lands only after ``release``."""

    def __init__(self, inner: MemoryBackend, first: Token) -> None:
        super().__init__()
        self.inner = inner
        self.first = first
        self.seen: dict[str, int] = {}
        self.release = asyncio.Event()

    async def get(self, key: str) -> Token | None:
        return await self.inner.get(key)

    async def set(self, key: str, token: Token) -> None:
        renewed = token.refresh_token is not None and token.access_token != self.first.access_token
        if not renewed:
            await self.inner.set(key, token)
            return
        self.seen[token.access_token] = self.seen.get(token.access_token, 0) + 1
        if self.seen[token.access_token] == 1:
            await self.inner.set(key, token)
            await asyncio.sleep(1.0)  # past backend_timeout: taken for a failed write
        else:
            await self.release.wait()
            await self.inner.set(key, token)

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        return await self.inner.acquire_lock(key, lease=lease)

    async def renew_lock(self, handle: LockHandle, *, lease: float) -> bool:
        return await self.inner.renew_lock(handle, lease=lease)

    async def release_lock(self, handle: LockHandle) -> None:
        await self.inner.release_lock(handle)


async def test_a_late_rewrite_never_brings_back_a_spent_refresh_token() -> None:
    """A's write of its renewed pair times out but lands; B renews from it; a background
    retry of A's write would then put back A's pair, whose refresh token B spent."""
    async with FakeAuthServer(client_secret=SECRET) as server:
        store = MemoryBackend()
        a = manager_for(server, store, backend_retry_interval=0.05)
        b = manager_for(server, store)
        try:
            owner, first = await logged_in(server, a)
            late = LateWrites(store, first)
            a._shared.backend = late
            await a.invalidate(first.access_token, customer=owner)
            from_a = await a.token(customer=owner)
            assert (await stored(b, owner)).access_token == from_a.access_token  # type: ignore[union-attr]
            await b.invalidate(first.access_token, customer=owner)
            await b.invalidate(from_a.access_token, customer=owner)
            from_b = await b.token(customer=owner)
            late.release.set()
            await asyncio.sleep(0.5)  # a retry (0.1 s after the failure) would land now
            kept = await stored(b, owner)
            assert kept is not None
            assert kept.access_token == from_b.access_token
            await b.invalidate(from_b.access_token, customer=owner)
            third = await b.token(customer=owner)
        finally:
            await a.aclose()
            await b.aclose()
        assert third.access_token not in (first.access_token, from_a.access_token)
        assert server.customers.refresh_requests == 3
        assert server.customers.refresh_reuses == 0


def test_the_mark_is_covered_by_the_mac() -> None:
    from cl_tokens._keys import credential_keys

    keys = credential_keys("https://auth.example", "client", SECRET)
    token = Token(
        "abc.def.ghi", "Bearer", None, time.time() + 60, refresh_token="r" * 20, owner_id="c1"
    )
    marked = replace(token, refresh_sent=time.time())
    sealed = replace(marked, seal=keys.seal("k", marked))
    assert keys.verify("k", sealed)
    assert not keys.verify("k", replace(sealed, refresh_sent=None))  # mark removed
    assert not keys.verify("k", replace(sealed, refresh_sent=1.0))  # mark moved back
    # A value sealed without a mark keeps its seal (stored before marks existed).
    plain = replace(token, seal=keys.seal("k", token))
    assert keys.verify("k", plain)
    assert Token.from_dict(sealed.to_dict()).refresh_sent == marked.refresh_sent
