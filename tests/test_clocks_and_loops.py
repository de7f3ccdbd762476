"""The hot tier against what its timers cannot see: closed loops, stopped loops,
clocks stepped back, tokens reissued inside their margin."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from cl_tokens import TokenEndpointError, TokenManager
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"


@pytest.fixture
def threaded_server() -> Iterator[FakeAuthServer]:
    """A FakeAuthServer on a loop of its own thread, to outlive the loops under test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = FakeAuthServer(client_secret=SECRET, expires_in=3)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    yield server
    asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_a_loop_closed_with_timers_pending_leaves_nothing_hot(
    threaded_server: FakeAuthServer,
) -> None:
    manager = TokenManager(threaded_server.client_id, SECRET, auth_url=threaded_server.url)
    first_loop = asyncio.new_event_loop()
    first = first_loop.run_until_complete(manager.token())
    first_loop.close()  # without cancelling the manager's tasks: its timers just vanish
    time.sleep(first.expires_at - time.time() + 0.2)  # the token has expired

    async def later() -> tuple[str, str]:
        token = await manager.token()
        header = await manager.header()
        await manager.aclose()
        return token.access_token, header["Authorization"]

    access, header = asyncio.run(later())
    assert access != first.access_token
    assert header == f"Bearer {access}"
    assert threaded_server.token_requests == 2


def test_without_the_hot_tier_a_restarted_loop_never_serves_an_expired_token(
    threaded_server: FakeAuthServer,
) -> None:
    manager = TokenManager(
        threaded_server.client_id, SECRET, auth_url=threaded_server.url, hot_tier=False
    )
    loop = asyncio.new_event_loop()
    try:
        first = loop.run_until_complete(manager.token())
        time.sleep(first.expires_at - time.time() + 0.2)  # loop stopped past expiry
        second = loop.run_until_complete(manager.token())
        assert second.access_token != first.access_token
        assert second.expires_at > time.time()
        loop.run_until_complete(manager.aclose())
    finally:
        loop.close()


class SteppingClock:
    """The system clocks, with a wall clock that can be stepped back (NTP, VM restore)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


async def test_a_wall_clock_stepped_back_does_not_revive_an_expired_token() -> None:
    clock = SteppingClock()
    async with (
        FakeAuthServer(expires_in=2) as server,
        TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, clock=clock
        ) as manager,
    ):
        first = await manager.token()
        clock.offset = -60.0
        await asyncio.sleep(2.2)  # expired by the monotonic clock, fresh by the wall one
        second = await manager.token()
        assert second.access_token != first.access_token
        assert server.is_live(second.access_token)
        assert server.token_requests == 2


async def test_a_reissued_token_inside_its_margin_is_not_handed_to_blocked_callers() -> None:
    # Like Commerce Layer with a refresh window wider than its reissue window: the same
    # token comes back until only reissue_window of its life is left.
    async with (
        FakeAuthServer(expires_in=8, reissue_window=1.0) as server,
        TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, attempts=1
        ) as manager,
    ):
        first = await manager.token()  # margin 2 s, refresh window 4 s
        await asyncio.sleep(first.expires_at - time.time() - 2.6)
        server.delay_next(1, seconds=1.0)
        assert await manager.token() == first  # in the window: a slow refresh starts
        await asyncio.sleep(0.7)  # now inside the margin: callers block on that flight
        with pytest.raises(TokenEndpointError, match="inside the safety margin"):
            await manager.token()
