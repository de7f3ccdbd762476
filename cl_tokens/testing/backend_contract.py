"""The contract every ``TokenBackend`` must honour, as a reusable pytest class.

Installed with the package (it needs pytest and pytest-asyncio, which cl-tokens itself
does not), so the author of a third-party backend runs the same suite as the bundled
backends. Subclass ``BackendContract`` in a test module (the subclass name must start
with ``Test``) and provide the async fixture ``backend``::

    from cl_tokens.testing.backend_contract import BackendContract

    class TestMyBackend(BackendContract):
        @pytest.fixture
        async def backend(self, key_prefix):
            async with MyBackend(...) as backend:
                yield backend

Every key the suite uses starts with ``key_prefix`` (a fixture, unique per test), so a
backend on a shared server can delete exactly those keys on teardown. Override
``stored_bytes`` to let the suite look at what the backend really stored; without it the
"no secret at rest" test checks ``repr`` only. The suite needs pytest-asyncio, in
either mode: its tests carry the ``asyncio`` mark; in strict mode, declare your
``backend`` fixture with ``@pytest_asyncio.fixture``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest

from cl_tokens import BackendError, Token
from cl_tokens.backends import LockHandle, TokenBackend

__all__ = ["BackendContract", "make_token"]


def make_token(
    *, expires_in: float = 3600.0, scope: str | None = "market:code:europe", access: str = ""
) -> Token:
    """A token with every field set, expiring ``expires_in`` seconds from now."""
    now = time.time()
    return Token(
        access_token=access or f"eyJ.{uuid.uuid4().hex}.sig",
        token_type="Bearer",
        scope=scope,
        expires_at=now + expires_in,
        created_at=float(int(now)),
        lifetime=7200.0,
    )


class BackendContract:
    """Behaviour shared by every backend; subclasses provide the ``backend`` fixture."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    @pytest.fixture
    def key_prefix(self) -> str:
        """A key prefix no other test uses."""
        return f"cl_tokens:test:{uuid.uuid4().hex}:"

    @pytest.fixture
    async def backend(self, key_prefix: str) -> AsyncIterator[TokenBackend]:
        """Override: yield the backend under test, closing it afterwards."""
        raise NotImplementedError("subclass BackendContract and provide a `backend` fixture")
        yield  # pragma: no cover  # noqa: PT022 - an async generator, like the overrides

    async def stored_bytes(self, backend: TokenBackend, key_prefix: str) -> bytes | None:
        """Override: every key and value the backend stored for this test, or None."""
        return None

    # -- read and write ------------------------------------------------------------

    async def test_get_missing_is_none(self, backend: TokenBackend, key_prefix: str) -> None:
        assert await backend.get(key_prefix + "missing") is None

    async def test_round_trip_keeps_every_field(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        token = make_token()
        await backend.set(key_prefix + "k", token)
        stored = await backend.get(key_prefix + "k")
        assert stored == token
        assert stored is not None
        assert stored.to_dict() == token.to_dict()

    async def test_round_trip_of_optional_fields(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        token = Token(
            access_token="opaque", token_type="bearer", scope=None, expires_at=time.time() + 60
        )
        await backend.set(key_prefix + "k", token)
        assert await backend.get(key_prefix + "k") == token

    async def test_expired_token_is_a_miss(self, backend: TokenBackend, key_prefix: str) -> None:
        await backend.set(key_prefix + "old", make_token(expires_in=-1))
        assert await backend.get(key_prefix + "old") is None
        # An expired token written over a live one leaves no token either.
        await backend.set(key_prefix + "k", make_token())
        await backend.set(key_prefix + "k", make_token(expires_in=-1))
        assert await backend.get(key_prefix + "k") is None

    async def test_set_overwrites(self, backend: TokenBackend, key_prefix: str) -> None:
        first, second = make_token(), make_token()
        await backend.set(key_prefix + "k", first)
        await backend.set(key_prefix + "k", second)
        assert await backend.get(key_prefix + "k") == second

    async def test_delete(self, backend: TokenBackend, key_prefix: str) -> None:
        await backend.set(key_prefix + "k", make_token())
        assert await backend.delete(key_prefix + "k") is True
        assert await backend.get(key_prefix + "k") is None
        assert await backend.delete(key_prefix + "k") is False

    async def test_delete_if_it_holds_that_token(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        token = make_token()
        await backend.set(key_prefix + "k", token)
        assert await backend.delete(key_prefix + "k", "some-other-token") is False
        assert await backend.get(key_prefix + "k") == token
        assert await backend.delete(key_prefix + "k", token.access_token) is True
        assert await backend.get(key_prefix + "k") is None
        assert await backend.delete(key_prefix + "k", token.access_token) is False

    async def test_keys_are_independent(self, backend: TokenBackend, key_prefix: str) -> None:
        a, b = make_token(), make_token()
        await backend.set(key_prefix + "a", a)
        await backend.set(key_prefix + "b", b)
        assert await backend.delete(key_prefix + "a") is True
        assert await backend.get(key_prefix + "b") == b
        handle = await backend.acquire_lock(key_prefix + "a", lease=10)
        assert handle is not None
        other = await backend.acquire_lock(key_prefix + "b", lease=10)
        assert other is not None
        await backend.release_lock(handle)
        await backend.release_lock(other)

    # -- locks -------------------------------------------------------------------------

    async def test_lock_excludes_until_released(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        handle = await backend.acquire_lock(key, lease=10)
        assert isinstance(handle, LockHandle)
        assert await backend.acquire_lock(key, lease=10) is None
        await backend.release_lock(handle)
        again = await backend.acquire_lock(key, lease=10)
        assert again is not None
        await backend.release_lock(again)

    async def test_release_by_a_non_owner_does_nothing(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        handle = await backend.acquire_lock(key, lease=10)
        assert handle is not None
        await backend.release_lock(LockHandle(key, "not-the-owner"))
        assert await backend.acquire_lock(key, lease=10) is None
        await backend.release_lock(handle)
        # A second release of the same handle is harmless too.
        await backend.release_lock(handle)

    async def test_lock_waits_for_the_holder(self, backend: TokenBackend, key_prefix: str) -> None:
        key = key_prefix + "k"
        handle = await backend.acquire_lock(key, lease=10)
        assert handle is not None

        async def release_soon() -> None:
            await asyncio.sleep(0.2)
            await backend.release_lock(handle)

        releaser = asyncio.create_task(release_soon())
        started = time.monotonic()
        async with backend.lock(key, lease=10, timeout=10) as taken:
            assert time.monotonic() - started >= 0.15
            assert taken.key == key
        await releaser

    async def test_lock_times_out_with_backend_error(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        handle = await backend.acquire_lock(key, lease=10)
        assert handle is not None
        started = time.monotonic()
        with pytest.raises(BackendError, match="timed out"):
            async with backend.lock(key, lease=10, timeout=0.3):
                pytest.fail("the lock was taken twice")
        assert 0.25 <= time.monotonic() - started < 5
        await backend.release_lock(handle)

    async def test_concurrent_lock_users_never_overlap(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        counter = 0
        inside = 0
        overlaps = 0

        async def work() -> None:
            nonlocal counter, inside, overlaps
            async with backend.lock(key, lease=30, timeout=60, poll=0.005):
                inside += 1
                overlaps += inside > 1
                seen = counter
                await asyncio.sleep(0)
                await asyncio.sleep(0.001)
                counter = seen + 1
                inside -= 1

        await asyncio.gather(*(work() for _ in range(50)))
        assert (counter, overlaps) == (50, 0)
        handle = await backend.acquire_lock(key, lease=10)
        assert handle is not None, "the lock was not released"
        await backend.release_lock(handle)

    async def test_renew_extends_only_the_owners_lock(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        handle = await backend.acquire_lock(key, lease=0.5)
        assert handle is not None
        assert await backend.renew_lock(handle, lease=10) is True
        if type(backend).renew_lock is TokenBackend.renew_lock:
            # The documented default: locks that die with their holder need no renewal.
            await backend.release_lock(handle)
            return
        assert await backend.renew_lock(LockHandle(key, "not-the-owner"), lease=10) is False
        await asyncio.sleep(0.8)  # past the first lease: only the renewal holds it now
        assert await backend.acquire_lock(key, lease=10) is None
        await backend.release_lock(handle)
        assert await backend.renew_lock(handle, lease=10) is False  # released: not ours

    async def test_a_lapsed_lease_cannot_be_renewed(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        if type(backend).renew_lock is TokenBackend.renew_lock:
            assert await backend.renew_lock(LockHandle(key_prefix + "k", "x"), lease=1) is True
            return
        key = key_prefix + "k"
        stale = await backend.acquire_lock(key, lease=0.1)
        assert stale is not None
        await asyncio.sleep(0.25)
        fresh = await backend.acquire_lock(key, lease=10)
        assert fresh is not None
        assert await backend.renew_lock(stale, lease=10) is False
        await backend.release_lock(fresh)

    # -- back-off ------------------------------------------------------------------------

    async def test_backoff_round_trip_and_expiry(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        assert await backend.get_backoff(key) is None
        if type(backend).get_backoff is TokenBackend.get_backoff:
            await backend.set_backoff(key, time.time() + 30)  # accepted, kept in-process
            return
        retry_at = time.time() + 30
        await backend.set_backoff(key, retry_at)
        stored = await backend.get_backoff(key)
        assert stored is not None
        assert abs(stored - retry_at) < 0.01
        assert await backend.get_backoff(key_prefix + "other") is None
        assert await backend.get(key) is None  # a back-off is not a token
        await backend.set_backoff(key, time.time() + 0.3)  # a later write replaces it
        assert (await backend.get_backoff(key) or 0) < retry_at
        await asyncio.sleep(0.5)
        assert await backend.get_backoff(key) is None  # expired with its retry_at
        await backend.set_backoff(key, time.time() - 1)  # already over: none in force
        assert await backend.get_backoff(key) is None

    async def test_backoff_and_token_live_side_by_side(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        token = make_token()
        await backend.set(key, token)
        await backend.set_backoff(key, time.time() + 30)
        assert await backend.get(key) == token
        assert await backend.delete(key) is True
        if type(backend).get_backoff is not TokenBackend.get_backoff:
            assert await backend.get_backoff(key) is not None  # deleting a token keeps it

    # -- secrets and lifecycle ---------------------------------------------------------------

    async def test_no_secret_at_rest(self, backend: TokenBackend, key_prefix: str) -> None:
        secret = f"client-secret-{uuid.uuid4().hex}"
        # Managers derive keys from non-secret parts; a hash is the most a key may hold.
        key = key_prefix + hashlib.sha256(secret.encode()).hexdigest()[:40]
        await backend.set(key, make_token())
        handle = await backend.acquire_lock(key, lease=10)
        assert handle is not None
        stored = await self.stored_bytes(backend, key_prefix)
        await backend.release_lock(handle)
        assert secret not in repr(backend)
        if stored is not None:
            assert stored, "stored_bytes found nothing: the hook looks in the wrong place"
            assert secret.encode() not in stored

    async def test_aclose_and_async_with(self, backend: TokenBackend) -> None:
        async with backend as entered:
            assert entered is backend
        await backend.aclose()  # closing twice is harmless

    # -- the cold path: get_or_lock, set_and_release, wait_for ---------------------

    async def test_get_or_lock_takes_the_lock_on_a_miss(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        handle = await backend.get_or_lock(key, lease=10)
        assert isinstance(handle, LockHandle)
        assert handle.key == key
        assert await backend.get_or_lock(key, lease=10) is None  # held: wait
        assert await backend.acquire_lock(key, lease=10) is None
        await backend.release_lock(handle)
        again = await backend.get_or_lock(key, lease=10)
        assert isinstance(again, LockHandle)
        await backend.release_lock(again)

    async def test_get_or_lock_returns_a_stored_token_unless_refused(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        token = make_token()
        await backend.set(key, token)
        assert await backend.get_or_lock(key, lease=10) == token
        assert await backend.get_or_lock(key, lease=10, refuse="another") == token
        free = await backend.acquire_lock(key, lease=10)
        assert free is not None, "get_or_lock took the lock though a token was stored"
        await backend.release_lock(free)
        handle = await backend.get_or_lock(key + "x", lease=10, refuse=token.access_token)
        assert isinstance(handle, LockHandle)  # nothing under key + "x"
        await backend.release_lock(handle)

    async def test_get_or_lock_refusing_the_stored_token_takes_the_lock(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        token = make_token()
        await backend.set(key, token)
        handle = await backend.get_or_lock(key, lease=10, refuse=token.access_token)
        assert isinstance(handle, LockHandle)
        assert await backend.get_or_lock(key, lease=10, refuse=token.access_token) is None
        await backend.release_lock(handle)

    async def test_set_and_release_stores_and_frees_the_lock(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        handle = await backend.get_or_lock(key, lease=10)
        assert isinstance(handle, LockHandle)
        token = make_token()
        await backend.set_and_release(key, token, handle)
        assert await backend.get(key) == token
        assert await backend.get_or_lock(key, lease=10) == token
        free = await backend.acquire_lock(key, lease=10)
        assert free is not None, "set_and_release left the lock held"
        await backend.release_lock(free)

    async def test_set_and_release_by_a_lapsed_holder_keeps_the_new_lock(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        if type(backend).renew_lock is TokenBackend.renew_lock:
            return  # its locks last as long as their holder, not a lease (file locks)
        key = key_prefix + "k"
        old = await backend.acquire_lock(key, lease=0.1)
        assert old is not None
        await asyncio.sleep(0.3)
        new = await backend.acquire_lock(key, lease=10)
        assert new is not None
        token = make_token()
        await backend.set_and_release(key, token, old)
        assert await backend.get(key) == token  # the token is good, whoever wrote it
        assert await backend.acquire_lock(key, lease=10) is None  # the new lock stays
        await backend.release_lock(new)

    async def test_wait_for_returns_a_stored_token_at_once(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        token = make_token()
        await backend.set(key, token)
        assert await backend.wait_for(key, timeout=5) == token

    async def test_wait_for_times_out_with_none(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        refused = make_token()
        await backend.set(key, refused)
        handle = await backend.get_or_lock(key, lease=10, refuse=refused.access_token)
        assert isinstance(handle, LockHandle)
        started = time.monotonic()
        assert await backend.wait_for(key, timeout=0.3, refuse=refused.access_token) is None
        assert 0.25 <= time.monotonic() - started < 5
        await backend.release_lock(handle)

    async def test_wait_for_sees_the_holders_write(
        self, backend: TokenBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "k"
        stale = make_token()
        await backend.set(key, stale)
        handle = await backend.get_or_lock(key, lease=10, refuse=stale.access_token)
        assert isinstance(handle, LockHandle)
        fresh = make_token()

        async def write_soon() -> None:
            await asyncio.sleep(0.2)
            await backend.set_and_release(key, fresh, handle)

        writer = asyncio.create_task(write_soon())
        waiters = [backend.wait_for(key, timeout=10, refuse=stale.access_token) for _ in range(3)]
        assert await asyncio.gather(*waiters) == [fresh] * 3
        await writer

    async def test_wait_for_is_cancellable(self, backend: TokenBackend, key_prefix: str) -> None:
        key = key_prefix + "k"
        handle = await backend.get_or_lock(key, lease=30)
        assert isinstance(handle, LockHandle)
        waiter = asyncio.create_task(backend.wait_for(key, timeout=30))
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await backend.release_lock(handle)
        token = make_token()
        await backend.set(key, token)
        assert await backend.wait_for(key, timeout=5) == token  # still usable
