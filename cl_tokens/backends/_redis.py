"""The Redis backend: tokens shared by every process and machine that reach one Redis.

A value is ``<sha256 hex of the access token>|<codec bytes>`` (see ``_codec``). The
digest in front lets a Lua script compare-and-delete atomically by access token even
when the rest is encrypted, without a WATCH/MULTI round trip and on Redis Cluster too;
it is not a secret, as a hash of a random bearer token cannot be turned back into one.
Values expire with the token (``PX`` of the time left by our clock, so a skewed Redis
clock changes nothing). The lock is ``SET <key>:lock <owner> NX PX <lease>``, released
by a Lua compare-and-delete so only its owner can release it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

from .._clock import Clock, SystemClock
from .._errors import BackendError, ConfigurationError
from .._token import Token
from ._base import BackendURL, LockHandle, TokenBackend
from ._codec import EncryptionKey, make_codec

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

    RedisClient: TypeAlias = Redis | RedisCluster

__all__ = ["RedisBackend"]

_INSTALL = "the Redis backend needs the redis package: pip install 'cl-tokens[redis]'"
_DIGEST_LEN = 64
_SEPARATOR = b"|"
_LOCK_SUFFIX = ":lock"

_DELETE_IF_DIGEST = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, 64) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Taking the lock is idempotent for its owner: redis-py resends a command after a
# socket timeout, and a resent SET NX would fail against the lock this very call took,
# leaving it held by nobody who knows it for the whole lease.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return 1
end
return 0
"""

_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


# Releases started for cancelled lock attempts: held here so they are not collected
# before they finish.
_RELEASES: set[asyncio.Future[None]] = set()


def _digest(access_token: str) -> str:
    return hashlib.sha256(access_token.encode()).hexdigest()


def _safe_url(url: BackendURL) -> str:
    """Scheme, user, host, port and database only: no password, no query (which may
    hold one)."""
    user = url.username or ""
    if url.password:
        user += ":***"
    netloc = (f"{user}@" if user else "") + (url.host or "")
    if url.port is not None:
        netloc += f":{url.port}"
    return f"{url.scheme}://{netloc}{url.path}"


class RedisBackend(TokenBackend):
    """Tokens in Redis (or Redis Cluster), shared by every process that can reach it.

    Give either a ready client or a URL. A client you pass stays yours: ``aclose`` does
    not close it. A client built from ``url`` gets short timeouts and a single quick
    retry, so a dead Redis fails in about ``socket_timeout`` seconds instead of stalling
    the token path; options in the URL's query (``?socket_timeout=3``) win over these.

    URLs: ``redis://[user:password@]host[:port][/db]``, ``rediss://`` for TLS and
    ``redis+cluster://host:port`` for Redis Cluster. Secrets other than the Redis
    password (``encryption_key``) are arguments, never part of the URL.

    Args:
        client: a ``redis.asyncio.Redis`` or ``RedisCluster`` to use as is.
        url: where to connect, when no ``client`` is given.
        encryption_key: a Fernet key, or a list of them (the first encrypts), to store
            tokens encrypted; needs ``pip install 'cl-tokens[encryption]'``.
        socket_timeout: seconds to wait to connect and for each reply (built client).
        clock: where "now" comes from for expiry (default: the system clock).
        **client_options: more keyword arguments for the built client (``retry``,
            ``ssl_ca_certs``, ``max_connections``...).

    Raises:
        ConfigurationError: the redis package is missing, both or neither of ``client``
            and ``url`` are given, or the URL is not a Redis one.
    """

    schemes = ("redis", "rediss", "redis+cluster")

    def __init__(
        self,
        client: RedisClient | None = None,
        *,
        url: str | None = None,
        encryption_key: EncryptionKey | None = None,
        socket_timeout: float = 1.0,
        clock: Clock | None = None,
        **client_options: Any,
    ) -> None:
        try:
            from redis.exceptions import RedisError
        except ImportError:
            raise ConfigurationError(_INSTALL) from None
        self._client: RedisClient
        if client is not None and url is None:
            if client_options:
                raise ConfigurationError(
                    f"client options ({', '.join(sorted(client_options))}) apply only to a "
                    "client built from url="
                )
            self._client = client
            self._owns_client = False
            self._where = f"client={type(client).__name__}"
        elif url is not None and client is None:
            parsed = BackendURL.parse(url)
            self._client = _build_client(parsed, socket_timeout, client_options)
            self._owns_client = True
            self._where = f"url={_safe_url(parsed)!r}"
        else:
            raise ConfigurationError("RedisBackend takes a client or a url: exactly one of them")
        self._codec = make_codec(encryption_key)
        self._clock: Clock = clock or SystemClock()
        # asyncio.TimeoutError is OSError's TimeoutError only from Python 3.11.
        self._errors: tuple[type[BaseException], ...] = (
            RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        self._delete_if_digest = self._client.register_script(_DELETE_IF_DIGEST)
        self._release_if_owner = self._client.register_script(_RELEASE_IF_OWNER)
        self._acquire = self._client.register_script(_ACQUIRE)

    @classmethod
    def from_url(cls, url: BackendURL, **options: Any) -> RedisBackend:
        """Build from ``redis://``, ``rediss://`` or ``redis+cluster://``.

        Args:
            url: the parsed URL.
            **options: keyword arguments of the constructor (``encryption_key``,
                ``socket_timeout``, ``clock``, client options).
        """
        if "encryption_key" in url.query:
            # URLs end up in logs and process lists; the key must not.
            raise ConfigurationError(
                "encryption_key does not belong in the backend URL; pass encryption_key="
            )
        return cls(url=url.raw, **options)

    def __repr__(self) -> str:
        return f"RedisBackend({self._where}, encrypted={self._codec.encrypted})"

    @property
    def client(self) -> RedisClient:
        """The Redis client in use."""
        return self._client

    @contextlib.contextmanager
    def _wrap_errors(self, action: str, key: str) -> Iterator[None]:
        """Turn Redis, socket and timeout errors into BackendError (cause kept)."""
        try:
            yield
        except self._errors as exc:
            raise BackendError(
                f"Redis could not {action} {key}: {type(exc).__name__}: {exc}"
            ) from exc

    def _decode(self, raw: bytes | str) -> Token | None:
        # A client made with decode_responses=True hands back str; the value is ASCII.
        data = raw.encode() if isinstance(raw, str) else raw
        if data[_DIGEST_LEN : _DIGEST_LEN + 1] != _SEPARATOR:
            return None
        return self._codec.decode(data[_DIGEST_LEN + 1 :])

    async def get(self, key: str) -> Token | None:
        with self._wrap_errors("read", key):
            raw = await self._client.get(key)
        if raw is None:
            return None
        token = self._decode(raw)
        if token is None or token.expires_at <= self._clock.time():
            return None
        return token

    async def set(self, key: str, token: Token) -> None:
        value = _digest(token.access_token).encode() + _SEPARATOR + self._codec.encode(token)
        ttl_ms = int((token.expires_at - self._clock.time()) * 1000)
        with self._wrap_errors("write", key):
            if ttl_ms <= 0:
                # Storing an expired token means holding none (as a later get would say).
                await self._client.delete(key)
            else:
                await self._client.set(key, value, px=ttl_ms)

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        with self._wrap_errors("delete", key):
            if access_token is None:
                deleted = await self._client.delete(key)
            else:
                deleted = await self._delete_if_digest(keys=[key], args=[_digest(access_token)])
        return bool(deleted)

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        owner = secrets.token_hex(16)
        lease_ms = max(1, int(lease * 1000))
        handle = LockHandle(key, owner)
        try:
            with self._wrap_errors("lock", key):
                taken = await self._acquire(keys=[key + _LOCK_SUFFIX], args=[owner, lease_ms])
        except asyncio.CancelledError:
            # The SET may have reached Redis before the cancellation: release by owner
            # (a no-op if it did not), or the lock would block others for its lease.
            release = asyncio.ensure_future(self._release_quietly(handle))
            _RELEASES.add(release)
            release.add_done_callback(_RELEASES.discard)
            raise
        return handle if taken else None

    async def _release_quietly(self, handle: LockHandle) -> None:
        try:
            await self.release_lock(handle)
        except Exception:
            pass

    async def release_lock(self, handle: LockHandle) -> None:
        with self._wrap_errors("unlock", handle.key):
            await self._release_if_owner(keys=[handle.key + _LOCK_SUFFIX], args=[handle.owner])

    async def aclose(self) -> None:
        if self._owns_client:
            with self._wrap_errors("close the connection for", "the backend"):
                await self._client.aclose()


def _build_client(url: BackendURL, socket_timeout: float, options: dict[str, Any]) -> RedisClient:
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    if url.scheme not in RedisBackend.schemes:
        raise ConfigurationError(
            f"RedisBackend takes redis://, rediss:// or redis+cluster:// URLs, not {_safe_url(url)}"
        )
    settings: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        # One quick retry heals a pooled connection that a Redis restart broke; the
        # default (10 retries) would hold the token path for seconds on a dead server.
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1),
        **options,
    }
    if url.scheme == "redis+cluster":
        # Connects lazily, on the first command, like the single-node client.
        return RedisCluster.from_url("redis://" + url.raw.split("://", 1)[1], **settings)
    return Redis.from_url(url.raw, **settings)
