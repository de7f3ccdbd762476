"""Fork- and loop-safety, bounded per-key memory, and managers dropped without aclose().

The fake token server runs on a thread of its own here, so a forked child (which cannot
use its parent's event loop) reaches it as any other process would.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeclock import FakeClock
from redis_support import RedisServer

from cl_tokens import AuthenticationError, Token, TokenEndpointError, TokenManager
from cl_tokens.backends import MemoryBackend
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"


class ThreadedServer:
    """A FakeAuthServer on its own thread and event loop."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.server: FakeAuthServer

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.server = FakeAuthServer(client_secret=SECRET, **self._options)
        self._loop.run_until_complete(self.server.start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.aclose())
        self._loop.close()

    def __enter__(self) -> FakeAuthServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def threaded_server() -> Iterator[FakeAuthServer]:
    with ThreadedServer() as server:
        yield server


def _wait_child(pid: int, read_end: int, timeout: float = 60) -> Any:
    with os.fdopen(read_end, "rb") as pipe:  # read first: the child may fill the pipe
        data = pipe.read()
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline, "the child did not finish"
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0, data[-2000:]
    return json.loads(data)


def test_a_child_forked_inside_a_running_loop_never_serves_a_token_past_its_margin() -> None:
    """expires_in 4 s: margin 1 s. The child keeps asking for 6 s."""
    with ThreadedServer(expires_in=4) as server:
        manager = TokenManager(server.client_id, SECRET, auth_url=server.url)

        async def parent() -> Any:
            first = await manager.token()
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: the parent's loop is not usable here
                os.close(read_end)
                try:
                    seen = asyncio.run(_child_uses(manager, 6.0))
                    os.write(write_end, json.dumps(seen).encode())
                finally:
                    os._exit(0)
            os.close(write_end)
            # Blocking on purpose: the parent's loop must not run beside the child's.
            return first, _wait_child(pid, read_end)

        first, seen = asyncio.run(parent())
    assert seen, "the child was never served"
    assert all(at < expires_at - 1.0 for at, _, expires_at in seen)
    tokens = {token for _, token, _ in seen}
    assert first.access_token in tokens or len(tokens) > 1
    assert len(tokens) >= 2  # it moved on to new tokens instead of the inherited one


async def _child_uses(manager: TokenManager, seconds: float) -> list[tuple[float, str, float]]:
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        token = await manager.token()
        seen.append((time.time(), token.access_token, token.expires_at))
        await asyncio.sleep(0.05)
    await manager.aclose()
    return seen


def _fork_child_reads(manager: TokenManager, queue: Any) -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("cl_tokens").addHandler(Collect(logging.WARNING))

    async def read() -> str:
        try:
            return (await manager.token()).access_token
        finally:
            await manager.aclose()

    queue.put((asyncio.run(read()), records))


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_forked_children_read_the_shared_token_with_no_request_and_no_warning(
    threaded_server: FakeAuthServer, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "file":
        directory = tmp_path / "tokens"
        directory.mkdir(mode=0o700)
        backend = f"file://{directory}"
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        backend = redis.url
    server = threaded_server
    manager = TokenManager(server.client_id, SECRET, auth_url=server.url, backend=backend)

    async def use() -> str:
        return (await manager.token()).access_token

    token = asyncio.run(use())
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_fork_child_reads, args=(manager, queue)) for _ in range(4)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert [r[0] for r in results] == [token] * 4
    assert [r[1] for r in results] == [[]] * 4
    assert server.token_requests == 1

    async def close() -> None:
        await manager.aclose()

    asyncio.run(close())


def test_asyncio_run_twice_with_one_redis_backed_manager(
    threaded_server: FakeAuthServer, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = threaded_server
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    manager = TokenManager(server.client_id, SECRET, auth_url=server.url, backend=redis_server.url)
    other = TokenManager(server.client_id, SECRET, auth_url=server.url, backend=redis_server.url)

    async def use(m: TokenManager) -> str:
        return (await m.token()).access_token

    first = asyncio.run(use(manager))
    # A new loop: the in-process tier is gone with the old loop's hot path, and the
    # shared one must answer on this loop (no "Event loop is closed").
    second = asyncio.run(use(other))
    third = asyncio.run(use(other))
    assert first == second == third
    assert server.token_requests == 1
    assert [r.getMessage() for r in caplog.records] == []

    async def close() -> None:
        await manager.aclose()
        await other.aclose()

    asyncio.run(close())


# -- memory bounded by live tokens --------------------------------------------------------


async def test_20000_one_off_scopes_leave_nothing_behind_once_expired() -> None:
    clock = FakeClock()
    store = MemoryBackend(clock=clock)
    manager = TokenManager(
        "client",
        SECRET,
        auth_url="http://127.0.0.1:9/oauth/token",
        backend=store,
        clock=clock,
        # The periodic check walks every key: twice a second, not 100 times, while
        # 25,000 keys are being filled in.
        clock_check_interval=0.5,
        attempts=1,
    )
    issued = 0

    async def endpoint(scope: str | None, timeout: float) -> Token:
        nonlocal issued
        issued += 1
        assert scope is not None
        if scope.startswith("rejected"):
            raise AuthenticationError("token request rejected (HTTP 401)", status=401)
        if scope.startswith("failing"):
            raise TokenEndpointError("token endpoint answered HTTP 503", status=503, retryable=True)
        return Token(f"tok{issued}", "Bearer", scope, clock.time() + 600, lifetime=600)

    manager._endpoint.request = endpoint  # type: ignore[method-assign]
    for n in range(20_000):
        await manager.header(f"market:id:{n}")
    for n in range(2_500):
        with pytest.raises(AuthenticationError):
            await manager.header(f"rejected:{n}")
        with pytest.raises(TokenEndpointError):
            await manager.header(f"failing:{n}")
    assert len(manager._keys) == 25_000
    assert len(store._tokens) == 20_000

    clock.advance(600 + manager.tuning.throttle_cap + manager.tuning.auth_failure_cooldown + 1)
    await asyncio.sleep(1.5)  # the periodic check runs (every 0.5 s) and sweeps
    assert manager._keys == {}
    assert manager._cooldowns == {}
    assert manager._throttle.backoffs == {}
    assert manager._rejected == {}
    assert manager._tier.keys() == set()
    assert manager._tier._pending == {}
    assert manager._tier.headers == {}
    assert manager._tier.tokens == {}
    assert not manager._flights.tasks()
    await store.set("any", Token("x", "Bearer", None, clock.time() + 60))
    store._next_sweep = 0.0
    await store.set("any", Token("x", "Bearer", None, clock.time() + 60))
    assert list(store._tokens) == ["any"]
    await manager.aclose()


# -- dropped managers ---------------------------------------------------------------------


async def test_500_managers_dropped_without_aclose_are_collected_with_a_warning(
    server: FakeAuthServer,
) -> None:
    def keeper_tasks() -> int:
        return sum(
            1
            for task in asyncio.all_tasks()
            if task.get_name() == "cl_tokens clock check" and not task.done()
        )

    before = keeper_tasks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(500):
            manager = TokenManager(server.client_id, SECRET, auth_url=server.url)
            await manager.header()
            del manager
        gc.collect()
        await asyncio.sleep(0.05)  # the cancelled keeper tasks finish
        gc.collect()
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    mine = [w for w in unclosed if "unclosed TokenManager" in str(w.message)]
    assert len(mine) == 500
    assert SECRET not in " ".join(str(w.message) for w in unclosed)
    assert keeper_tasks() == before
