"""RedisBackend beyond the contract: TTLs, leases, encryption, URLs, a Redis that dies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from backend_contract import make_token
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from redis_support import (  # noqa: F401 - fixtures
    RedisServer,
    redis_key_prefix,
    redis_server,
    redis_url,
)

from cl_tokens import BackendError, ConfigurationError, Token
from cl_tokens.backends import LockHandle, RedisBackend, backend_from_url, known_schemes

ROOT = Path(__file__).resolve().parent.parent


class ShiftedClock:
    """The wall clock moved by ``offset`` seconds (a machine with a skewed clock)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:  # noqa: F811
    backend = RedisBackend(url=redis_url)
    async with backend:
        yield backend


def _single(backend: RedisBackend) -> Redis:
    assert isinstance(backend.client, Redis)
    return backend.client


@pytest.fixture
def key(redis_key_prefix: str) -> str:  # noqa: F811
    return redis_key_prefix + "token"


@pytest.mark.redis
async def test_ttl_follows_the_token(backend: RedisBackend, key: str) -> None:
    await backend.set(key, make_token(expires_in=100))
    ttl = await backend.client.pttl("{" + key + "}")
    assert 98_000 < ttl <= 100_000
    await backend.set(key, make_token(expires_in=-5))
    assert await backend.client.exists("{" + key + "}") == 0


@pytest.mark.redis
async def test_ttl_is_relative_to_our_clock(redis_url: str, key: str) -> None:  # noqa: F811
    # This machine's clock is 1000 s behind; the token's life left is what counts.
    clock = ShiftedClock(-1000)
    backend = RedisBackend(url=redis_url, clock=clock)
    async with backend:
        token = Token("tok", "Bearer", None, expires_at=clock.time() + 60, lifetime=60)
        await backend.set(key, token)
        assert 58_000 < await backend.client.pttl("{" + key + "}") <= 60_000
        assert await backend.get(key) == token


@pytest.mark.redis
async def test_lock_lease_expires(backend: RedisBackend, key: str) -> None:
    stale = await backend.acquire_lock(key, lease=0.1)
    assert stale is not None
    assert await backend.acquire_lock(key, lease=0.1) is None
    await asyncio.sleep(0.25)
    fresh = await backend.acquire_lock(key, lease=10)
    assert fresh is not None
    await backend.release_lock(stale)  # the stale owner must not free the new holder
    assert await backend.acquire_lock(key, lease=10) is None
    await backend.release_lock(fresh)
    assert await backend.client.exists("{" + key + "}:lock") == 0


@pytest.mark.redis
async def test_encryption(redis_url: str, key: str) -> None:  # noqa: F811
    secret_key, other_key = Fernet.generate_key(), Fernet.generate_key()
    token = make_token()
    sealed = RedisBackend(url=redis_url, encryption_key=secret_key)
    async with sealed:
        await sealed.set(key, token)
        assert await sealed.get(key) == token
        raw = await sealed.client.get("{" + key + "}")
        assert isinstance(raw, bytes)
        assert token.access_token.encode() not in raw
        assert b"access_token" not in raw
    async with RedisBackend(url=redis_url, encryption_key=other_key) as wrong:
        assert await wrong.get(key) is None
    async with RedisBackend(url=redis_url) as plain:
        assert await plain.get(key) is None
    async with RedisBackend(url=redis_url, encryption_key=[other_key, secret_key]) as rotated:
        assert await rotated.get(key) == token
        # Compare-and-delete works on sealed values through the digest in front.
        assert await rotated.delete(key, "another-token") is False
        assert await rotated.delete(key, token.access_token) is True


@pytest.mark.redis
@pytest.mark.parametrize(
    "raw",
    [b"", b"junk", b"x" * 64 + b"|{", "é".encode() * 40],
    ids=["empty", "junk", "digest-then-junk", "utf8"],
)
async def test_corrupt_value_is_a_miss(backend: RedisBackend, key: str, raw: bytes) -> None:
    await backend.client.set("{" + key + "}", raw)
    assert await backend.get(key) is None
    assert await backend.delete(key, "tok") is False
    await backend.set(key, make_token())
    assert await backend.get(key) is not None


@pytest.mark.redis
async def test_injected_client_is_used_and_left_open(redis_url: str, key: str) -> None:  # noqa: F811
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        backend = RedisBackend(client)
        assert repr(backend) == "RedisBackend(client=Redis, encrypted=False)"
        token = make_token()
        await backend.set(key, token)
        assert await backend.get(key) == token
        handle = await backend.acquire_lock(key, lease=10)
        assert handle is not None
        await backend.release_lock(handle)
        assert await backend.delete(key, token.access_token) is True
        await backend.aclose()
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_dead_redis_fails_fast_and_recovers(redis_server: RedisServer) -> None:  # noqa: F811
    async with RedisBackend(url=redis_server.url) as backend:
        await backend.set("k", make_token())
        assert await backend.get("k") is not None
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            await backend.get("k")
        assert time.monotonic() - started < 3
        assert caught.value.__cause__ is not None
        with pytest.raises(BackendError):
            await backend.acquire_lock("k", lease=1)
        redis_server.start()
        assert await backend.get("k") is None  # a fresh, empty server
        await backend.set("k", make_token())
        assert await backend.get("k") is not None


async def test_unreachable_redis_is_a_backend_error() -> None:
    async with RedisBackend(url="redis://127.0.0.1:1/0") as backend:
        started = time.monotonic()
        with pytest.raises(BackendError, match="ConnectionError"):
            await backend.set("k", make_token())
        assert time.monotonic() - started < 3


async def test_urls_build_clients_lazily() -> None:
    plain = backend_from_url("redis://:s3cret-pw@127.0.0.1:6399/3?password=qs-s3cret")
    tls = backend_from_url("rediss://user:s3cret-pw@cache.example:6380/0", socket_timeout=2.5)
    cluster = backend_from_url("redis+cluster://:s3cret-pw@127.0.0.1:7000")
    assert isinstance(plain, RedisBackend)
    assert isinstance(tls, RedisBackend)
    assert isinstance(cluster, RedisBackend)
    assert repr(plain) == "RedisBackend(url='redis://:***@127.0.0.1:6399/3', encrypted=False)"
    for backend in (plain, tls, cluster):
        assert "s3cret" not in repr(backend)
    options = _single(plain).connection_pool.connection_kwargs
    assert options["db"] == 3
    assert options["socket_timeout"] == 1.0
    assert options["socket_connect_timeout"] == 1.0
    assert _single(tls).connection_pool.connection_class.__name__ == "SSLConnection"
    assert _single(tls).connection_pool.connection_kwargs["socket_timeout"] == 2.5
    assert type(cluster.client).__name__ == "RedisCluster"
    for backend in (plain, tls, cluster):
        await backend.aclose()


def test_url_options_win() -> None:
    backend = backend_from_url("redis://127.0.0.1:6399/0?socket_timeout=7")
    assert isinstance(backend, RedisBackend)
    assert _single(backend).connection_pool.connection_kwargs["socket_timeout"] == 7.0


def test_encryption_key_is_refused_in_the_url() -> None:
    with pytest.raises(ConfigurationError, match="encryption_key") as caught:
        backend_from_url("redis://127.0.0.1/0?encryption_key=c2VjcmV0LWtleQ==")
    assert "c2VjcmV0LWtleQ" not in str(caught.value)


def test_client_xor_url() -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        RedisBackend()
    client = Redis()
    with pytest.raises(ConfigurationError, match="exactly one"):
        RedisBackend(client, url="redis://127.0.0.1/0")
    with pytest.raises(ConfigurationError, match="max_connections"):
        RedisBackend(client, max_connections=3)


def test_unknown_scheme_lists_the_known_ones() -> None:
    assert {"file", "memory", "redis", "rediss", "redis+cluster"} <= set(known_schemes())
    with pytest.raises(ConfigurationError) as caught:
        backend_from_url("memcached://user:pw@host:11211")
    message = str(caught.value)
    assert "memcached" in message
    assert "pw" not in message
    for scheme in ("file", "memory", "redis", "rediss", "redis+cluster"):
        assert scheme in message


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'cl-tokens\[redis\]'"):
        backend_from_url("redis://127.0.0.1:6379/0")


BLOCKED_IMPORTS = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("redis", "cryptography"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Block())
    import cl_tokens
    from cl_tokens.backends import FileBackend, MemoryBackend, RedisBackend, backend_from_url

    backend_from_url("memory://")
    FileBackend("/tmp/never-written")
    for make in (lambda: RedisBackend(url="redis://127.0.0.1/0"),
                 lambda: FileBackend("/tmp/x", encryption_key="k")):
        try:
            make()
        except cl_tokens.ConfigurationError as exc:
            print(exc)
    """
)


def test_package_imports_without_the_extras() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'cl-tokens[redis]'" in result.stdout
    assert "pip install 'cl-tokens[encryption]'" in result.stdout


@pytest.mark.redis
async def test_a_lock_attempt_cancelled_after_its_set_does_not_hold_the_lock(
    backend: RedisBackend, key: str
) -> None:
    client = _single(backend)
    scripts = (await backend._clients.use()).scripts
    real_acquire = scripts["acquire"]
    reached = asyncio.Event()

    async def acquire_then_stall(*args: object, **kwargs: object) -> object:
        result = await real_acquire(*args, **kwargs)  # type: ignore[arg-type]
        reached.set()  # the lock is in Redis; the reply is "late"
        await asyncio.sleep(10)
        return result

    scripts["acquire"] = acquire_then_stall
    attempt = asyncio.ensure_future(backend.acquire_lock(key, lease=60))
    await asyncio.wait_for(reached.wait(), 5)
    assert await client.exists("{" + key + "}:lock") == 1
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    scripts["acquire"] = real_acquire
    for _ in range(100):  # the release runs in the background
        if await client.exists("{" + key + "}:lock") == 0:
            break
        await asyncio.sleep(0.01)
    assert await client.exists("{" + key + "}:lock") == 0


@pytest.mark.redis
async def test_taking_the_lock_again_with_the_same_owner_succeeds(
    backend: RedisBackend, key: str
) -> None:
    # What redis-py does after a socket timeout: it sends the same command again.
    lock_key = "{" + key + "}:lock"
    acquire = (await backend._clients.use()).scripts["acquire"]
    assert await acquire(keys=[lock_key], args=["owner-a", 60_000]) == 1
    assert await acquire(keys=[lock_key], args=["owner-a", 60_000]) == 1
    assert await acquire(keys=[lock_key], args=["owner-b", 60_000]) == 0


# -- keys, back-offs, renewal ------------------------------------------------------------


@pytest.mark.redis
async def test_a_scopes_token_lock_and_backoff_share_one_cluster_slot(
    backend: RedisBackend, key: str
) -> None:
    from redis.crc import key_slot

    await backend.set(key, make_token())
    handle = await backend.acquire_lock(key, lease=10)
    assert handle is not None
    await backend.set_backoff(key, time.time() + 30)
    client = _single(backend)
    names = sorted([n async for n in client.scan_iter(match="{" + key + "}*")])
    assert names == [b"{" + key.encode() + b"}" + suffix for suffix in (b"", b":backoff", b":lock")]
    assert len({key_slot(name) for name in names}) == 1
    await backend.release_lock(handle)


@pytest.mark.redis
async def test_backoff_expires_in_redis_at_retry_at(backend: RedisBackend, key: str) -> None:
    await backend.set_backoff(key, time.time() + 20)
    assert 19_000 < await backend.client.pttl("{" + key + "}:backoff") <= 20_000


@pytest.mark.redis
@pytest.mark.parametrize(
    "raw", [b"", b"soon", b"nan", b"inf", b"1e400", b"9" * 400, "é".encode()], ids=repr
)
async def test_a_junk_backoff_is_none(backend: RedisBackend, key: str, raw: bytes) -> None:
    await backend.client.set("{" + key + "}:backoff", raw)
    assert await backend.get_backoff(key) is None


@pytest.mark.redis
async def test_renew_sets_the_new_lease(backend: RedisBackend, key: str) -> None:
    handle = await backend.acquire_lock(key, lease=1)
    assert handle is not None
    assert await backend.renew_lock(handle, lease=30) is True
    assert 29_000 < await backend.client.pttl("{" + key + "}:lock") <= 30_000
    await backend.release_lock(handle)


class BrokenClient:
    """A client whose every command fails as a half-initialized or wrong-loop one does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def register_script(self, script: str) -> object:
        async def run(keys: list[str], args: list[object]) -> object:
            raise self.error

        return run

    async def info(self, section: str) -> dict[str, object]:
        return {}

    def __getattr__(self, name: str) -> object:
        async def command(*args: object, **kwargs: object) -> object:
            raise self.error

        return command


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("Event loop is closed"),
        AttributeError("'NoneType' object has no attribute 'writelines'"),
        KeyError("slots"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_every_client_exception_becomes_backend_error(error: Exception) -> None:
    backend = RedisBackend(BrokenClient(error))  # type: ignore[arg-type]
    handle = LockHandle("k", "owner")
    calls = [
        backend.get("k"),
        backend.set("k", make_token()),
        backend.delete("k"),
        backend.delete("k", "tok"),
        backend.acquire_lock("k", lease=1),
        backend.renew_lock(handle, lease=1),
        backend.release_lock(handle),
        backend.get_backoff("k"),
        backend.set_backoff("k", time.time() + 5),
    ]
    for call in calls:
        with pytest.raises(BackendError) as caught:
            await call
        assert caught.value.__cause__ is error


@pytest.mark.redis
async def test_more_concurrent_calls_than_connections_wait_instead_of_failing(
    redis_url: str,  # noqa: F811
    key: str,
) -> None:
    # redis-py 8 raises MaxConnectionsError past a pool's max_connections (100 by
    # default, per node on a Cluster); the backend queues instead.
    async with RedisBackend(url=redis_url, max_connections=3) as backend:
        await backend.set(key, make_token())
        results = await asyncio.gather(*(backend.get(key) for _ in range(60)))
        assert all(r is not None for r in results)
        assert len(_single(backend).connection_pool._in_use_connections) == 0
