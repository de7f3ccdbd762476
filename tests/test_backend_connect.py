"""The backend's first connection on a loop: allowed several times ``backend_timeout``,
made once for every caller (issue 12: a Cluster client's slow start under a loaded
fleet was taken for an outage, and each process fetched by itself)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cl_tokens import TokenManager
from cl_tokens.backends import MemoryBackend
from cl_tokens.testing import FakeAuthServer


class SlowToConnect(MemoryBackend):
    """A memory backend whose first connection takes ``delay`` seconds."""

    def __init__(self, delay: float, *, fail: bool = False) -> None:
        super().__init__()
        self.delay = delay
        self.fail = fail
        self.connects = 0
        self.calls_before_connected = 0
        self.connected = False

    async def connect(self) -> None:
        self.connects += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise OSError("connection refused")
        self.connected = True

    async def get(self, key: str):  # type: ignore[no-untyped-def]
        if not self.connected:
            self.calls_before_connected += 1
        return await super().get(key)


async def test_a_slow_first_connection_is_made_once_and_is_not_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 3 x backend_timeout: a per-call timeout would call the backend down.
    backend = SlowToConnect(delay=0.6)
    async with (
        FakeAuthServer() as server,
        TokenManager(
            "test-client-id",
            "test-client-secret",
            auth_url=server.url,
            backend=backend,
            backend_timeout=0.2,
            lock_lease=0.4,
        ) as manager,
    ):
        with caplog.at_level(logging.WARNING, logger="cl_tokens"):
            headers = await asyncio.gather(*(manager.header() for _ in range(500)))
    assert backend.connects == 1
    assert backend.calls_before_connected == 0
    assert len({h["Authorization"] for h in headers}) == 1
    assert server.token_requests == 1
    assert not [r for r in caplog.records if "failed to" in r.getMessage()]


async def test_a_connection_past_its_allowance_is_a_backend_fault_and_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = SlowToConnect(delay=0.2, fail=True)
    async with (
        FakeAuthServer() as server,
        TokenManager(
            "test-client-id",
            "test-client-secret",
            auth_url=server.url,
            backend=backend,
            backend_timeout=0.02,
            lock_lease=0.04,
            backend_retry_interval=0.05,
        ) as manager,
    ):
        with caplog.at_level(logging.WARNING, logger="cl_tokens"):
            await asyncio.gather(*(manager.header() for _ in range(50)))
            warnings = [r.getMessage() for r in caplog.records]
            assert any("no connection within 0.1 s" in w for w in warnings), warnings
            assert backend.connects == 1  # 50 callers, one attempt
            await asyncio.sleep(0.1)  # past the retry interval
            await manager.invalidate((await manager.token()).access_token)
            await manager.header()
    assert backend.connects == 2  # tried again, once
    assert server.token_requests == 2


async def test_a_refused_connection_is_a_backend_fault_not_an_outage_of_the_manager(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = SlowToConnect(delay=0.0, fail=True)
    async with (
        FakeAuthServer() as server,
        TokenManager(
            "test-client-id",
            "test-client-secret",
            auth_url=server.url,
            backend=backend,
            backend_timeout=0.5,
        ) as manager,
    ):
        with caplog.at_level(logging.WARNING, logger="cl_tokens"):
            assert (await manager.header())["Authorization"].startswith("Bearer ")
    assert server.token_requests == 1
    assert any("OSError" in r.getMessage() for r in caplog.records)


async def test_each_new_event_loop_connects_again() -> None:
    backend = SlowToConnect(delay=0.0)
    async with FakeAuthServer() as server:
        manager = TokenManager(
            "test-client-id", "test-client-secret", auth_url=server.url, backend=backend
        )

        def first_loop() -> None:
            async def use() -> None:
                await manager.header()
                await manager.header("market:code:second")

            asyncio.run(use())

        await asyncio.to_thread(first_loop)
        assert backend.connects == 1  # two cold calls, one connection
        await manager.header("market:code:other")  # cold, on this loop
        assert backend.connects == 2
        await manager.aclose()
