"""Redis for the tests: the shared server's URL, per-test key cleanup, a throwaway server.

Fixtures (import them in ``conftest.py``):

- ``redis_url``: the URL in ``CL_TOKENS_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``)
  once it answers PING. If it does not, the test fails under ``CL_TOKENS_REQUIRE_REDIS=1``
  and is skipped otherwise.
- ``redis_key_prefix``: a key prefix unique to the test; on teardown, exactly the keys
  under it are deleted (the database is never flushed: it may not be ours).
- ``redis_server``: a private ``redis-server`` on a free port, which the test may
  ``stop()`` and ``start()`` again (for "Redis went away mid-run" tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest

__all__ = [
    "DEFAULT_REDIS_URL",
    "RedisServer",
    "delete_keys",
    "redis_key_prefix",
    "redis_server",
    "redis_unavailable",
    "redis_url",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
REDIS_SERVER_BINARY = "/usr/bin/redis-server"


def redis_unavailable(reason: str) -> NoReturn:
    """Fail under ``CL_TOKENS_REQUIRE_REDIS=1`` (CI must not skip silently), else skip."""
    if os.environ.get("CL_TOKENS_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason} (CL_TOKENS_REQUIRE_REDIS=1)")
    pytest.skip(f"{reason}; set CL_TOKENS_REDIS_URL or start Redis to run this test")


def _ping(url: str, timeout: float = 1.0) -> Exception | None:
    try:
        import redis
    except ImportError as exc:
        return exc
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return exc
    finally:
        client.close()
    return None


def delete_keys(url: str, prefix: str) -> int:
    """Delete every key starting with ``prefix`` or ``{prefix`` (the backend's hash-tagged
    form), and only those; returns how many."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        keys = [
            name
            for pattern in (prefix + "*", "{" + prefix + "*")
            for name in client.scan_iter(match=pattern, count=500)
        ]
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis's URL, once it answers; else fail or skip (see the module doc)."""
    url = os.environ.get("CL_TOKENS_REDIS_URL", DEFAULT_REDIS_URL)
    error = _ping(url)
    if error is not None:
        redis_unavailable(f"Redis at {url} is unreachable: {type(error).__name__}: {error}")
    return url


@pytest.fixture
def redis_key_prefix(redis_url: str) -> Iterator[str]:
    """A prefix only this test uses; its keys are deleted afterwards."""
    prefix = f"cl_tokens:test:{uuid.uuid4().hex}:"
    yield prefix
    delete_keys(redis_url, prefix)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A throwaway ``redis-server`` on a free local port, without persistence.

    ``stop()`` and ``start()`` keep the port, so clients built from ``url`` reconnect
    to the restarted server (empty: nothing is saved).

    Args:
        binary: path of ``redis-server``.
    """

    def __init__(self, binary: str = REDIS_SERVER_BINARY) -> None:
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="cl-tokens-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir,
                "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while _ping(self.url, timeout=0.2) is not None:
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, started ``redis-server``; stopped and removed after the test."""
    binary = shutil.which("redis-server") or REDIS_SERVER_BINARY
    if not os.access(binary, os.X_OK):
        redis_unavailable("redis-server is not installed")
    with RedisServer(binary) as server:
        yield server
