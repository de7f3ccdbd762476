"""A refresh that cannot reach the shared backend waits for it, while its token has time
to spare, instead of every process fetching around it (issue 12: a failover made each
process fetch for itself).

Two managers stand for two processes sharing one backend, on one FakeClock. Requests
are counted at the real fake server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fakeclock import FakeClock

from cl_tokens import BackendError, Token, TokenManager
from cl_tokens.backends import LockHandle, MemoryBackend
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"


class FailingOver(MemoryBackend):
    """A shared store that fails every call while ``down`` (a failover in progress)."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise BackendError("the primary is gone (a failover)")

    async def get(self, key: str) -> Token | None:
        self._check()
        return await super().get(key)

    async def set(self, key: str, token: Token) -> None:
        self._check()
        await super().set(key, token)

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        self._check()
        return await super().acquire_lock(key, lease=lease)


@asynccontextmanager
async def two_processes(
    server: FakeAuthServer, backend: FailingOver, clock: FakeClock
) -> AsyncIterator[tuple[TokenManager, TokenManager]]:
    made = [
        TokenManager(
            "test-client-id",
            SECRET,
            auth_url=server.url,
            backend=backend,
            clock=clock,
            clock_check_interval=0.01,
        )
        for _ in range(2)
    ]
    try:
        yield made[0], made[1]
    finally:
        for manager in made:
            await manager.aclose()


async def _serve_for(
    seconds: int, clock: FakeClock, managers: tuple[TokenManager, ...], expected: Token
) -> None:
    """Call both managers once per (fake) second; each must serve ``expected``."""
    for _ in range(seconds):
        for manager in managers:
            assert await manager.token() == expected
        clock.advance(1.0)
        await asyncio.sleep(0.002)


async def test_a_failover_during_the_refresh_window_costs_no_extra_request(
    server: FakeAuthServer,
) -> None:
    clock = FakeClock()
    backend = FailingOver(clock=clock)
    async with two_processes(server, backend, clock) as (one, two):
        first = await one.token()
        assert await two.token() == first  # from the shared store
        backend.down = True
        # Into both refresh windows (600 s + up to 60 s of jitter before expiry).
        clock.advance(first.expires_at - 590 - clock.time())
        await clock.settle()
        await _serve_for(120, clock, (one, two), first)
        assert server.token_requests == 1, "a process fetched around the failing store"
        backend.down = False
        clock.advance(1.0)
        await clock.settle()
        for _ in range(20):  # the next refreshes: one fetches, the other reads its token
            await one.token()
            await two.token()
            clock.advance(1.0)
            await asyncio.sleep(0.002)
        await clock.settle()
        assert server.token_requests == 2
        assert await one.token() == await two.token() != first


async def test_an_outage_past_half_the_refresh_span_fetches_around_the_store(
    server: FakeAuthServer,
) -> None:
    clock = FakeClock()
    backend = FailingOver(clock=clock)
    async with two_processes(server, backend, clock) as (one, two):
        first = await one.token()
        assert await two.token() == first
        backend.down = True
        clock.advance(first.expires_at - 590 - clock.time())
        await clock.settle()
        # Past the midpoint between the refresh moment and the 30-s margin, an outage
        # is no failover: each process refreshes on its own, ahead of the margin, and
        # no caller waits or gets an error meanwhile.
        for _ in range(560):
            for manager in (one, two):
                assert (await manager.token()).access_token in server.issued
            clock.advance(1.0)
            await asyncio.sleep(0.002)
        assert server.token_requests == 3, "each process refreshes once by itself"
        assert await one.token() != first
        assert await two.token() != first
