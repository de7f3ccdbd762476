"""One token request across OS processes sharing a file or Redis backend.

The FakeAuthServer runs on the test's event loop; workers are awaited with
``asyncio.create_subprocess_exec`` so the loop keeps serving them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis_support import RedisServer

from cl_tokens import TokenManager
from cl_tokens._keys import cache_key
from cl_tokens.backends import backend_from_url
from cl_tokens.testing import FakeAuthServer

WORKER = str(Path(__file__).with_name("cross_process_worker.py"))
pytestmark = pytest.mark.slow


async def _run_workers(
    server: FakeAuthServer, backend: str, processes: int, callers: int, lease: float = 60.0
) -> list[dict[str, Any]]:
    start_at = time.time() + 2.5  # time for every interpreter to start and import
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            WORKER,
            server.url,
            backend,
            str(callers),
            str(start_at),
            str(lease),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(processes)
    ]
    results = []
    for worker in workers:
        out, err = await asyncio.wait_for(worker.communicate(), 60)
        assert worker.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def _assert_one_token_for_everyone(
    server: FakeAuthServer, results: list[dict[str, Any]], callers: int
) -> None:
    assert server.token_requests == 1
    assert all(r["served"] == callers for r in results)
    headers = {h for r in results for h in r["headers"]}
    assert headers == {f"Bearer {server.issued[0]}"}


async def test_8_processes_x_250_callers_on_one_file_directory_make_one_request(
    tmp_path: Path,
) -> None:
    async with FakeAuthServer(latency=0.05) as server:
        results = await _run_workers(server, f"file://{tmp_path}", processes=8, callers=250)
    _assert_one_token_for_everyone(server, results, 250)


async def test_8_processes_x_250_callers_on_one_redis_make_one_request(
    redis_server: RedisServer,
) -> None:
    async with FakeAuthServer(latency=0.05) as server:
        results = await _run_workers(server, redis_server.url, processes=8, callers=250)
    _assert_one_token_for_everyone(server, results, 250)


async def _holder_killed_mid_fetch(backend_url: str, lease: float) -> float:
    """Kill -9 a process holding the lock; seconds until another process has a token."""
    async with FakeAuthServer() as server:
        server.delay_next(1, 60)  # the first fetch hangs, holding the lock
        start_at = time.time()
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            WORKER,
            server.url,
            backend_url,
            "1",
            str(start_at),
            str(lease),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        key = cache_key(server.url, server.client_id, None, server.client_secret)
        async with backend_from_url(backend_url) as backend:
            deadline = time.monotonic() + 20
            while server.token_requests == 0:  # the holder has the lock once it asks
                assert time.monotonic() < deadline, "the holder never sent its request"
                await asyncio.sleep(0.02)
            assert await backend.acquire_lock(key, lease=1) is None, "lock not held"
            holder.send_signal(signal.SIGKILL)
            await holder.wait()
            killed_at = time.monotonic()
            async with TokenManager(
                server.client_id, server.client_secret, auth_url=server.url, backend=backend
            ) as survivor:
                header = await survivor.header()
            recovered = time.monotonic() - killed_at
        assert header["Authorization"] == f"Bearer {server.issued[-1]}"
        assert server.token_requests == 2
        return recovered


async def test_a_lock_holder_killed_with_sigkill_frees_the_file_lock_at_once(
    tmp_path: Path,
) -> None:
    recovered = await _holder_killed_mid_fetch(f"file://{tmp_path}", lease=30)
    assert recovered < 2.0  # the OS drops an flock with its holder: no lease to wait out


async def test_a_lock_holder_killed_with_sigkill_blocks_redis_no_longer_than_its_lease(
    redis_server: RedisServer,
) -> None:
    recovered = await _holder_killed_mid_fetch(redis_server.url, lease=3)
    assert recovered < 3 + 1.0


async def test_redis_stopped_mid_run_keeps_header_answering_and_sharing_resumes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cl_tokens")
    async with FakeAuthServer() as server:
        options: dict[str, Any] = {
            "auth_url": server.url,
            "backend": redis_server.url,
            "backend_retry_interval": 0.2,
        }
        async with TokenManager(server.client_id, server.client_secret, **options) as first:
            token = (await first.token()).access_token
            redis_server.stop()
            # Warm calls never touch Redis; cold ones fetch directly, with one warning.
            for _ in range(100):
                assert (await first.header())["Authorization"] == f"Bearer {token}"
            for _ in range(5):
                await first.invalidate((await first.token()).access_token)
                assert (await first.header())["Authorization"].startswith("Bearer ")
                await asyncio.sleep(0.05)
            assert server.token_requests == 6
            failures = [r for r in caplog.records if "failed to" in r.getMessage()]
            assert 1 <= len(failures) <= 3  # one per outage noticed, not one per call

            redis_server.start()
            await asyncio.sleep(0.3)  # past backend_retry_interval
            await first.invalidate((await first.token()).access_token)
            shared = (await first.token()).access_token  # fetched and written to Redis
            assert server.token_requests == 7
            async with TokenManager(server.client_id, server.client_secret, **options) as second:
                assert (await second.token()).access_token == shared
            assert server.token_requests == 7
    assert any("answers again" in r.getMessage() for r in caplog.records)
