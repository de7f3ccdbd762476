"""The Redis backend: tokens shared by every process and machine that reach one Redis,
a Redis Cluster, or a Sentinel-managed primary.

Keys. The cache key ``K`` (opaque) maps to ``{K}`` (the token), ``{K}:lock`` and
``{K}:backoff``: one hash tag, so on a Cluster a scope's three keys share a slot and
one master, and a Lua script may touch them together.

Values. A token is ``<sha256 hex of the access token>|<codec bytes>`` (see ``_codec``).
The digest in front lets a Lua script compare-and-delete by access token even when the
rest is encrypted; it is not a secret (a hash of a random bearer token cannot be turned
back into one). Values expire with the token (``PX`` of the time left by our clock, so a
skewed Redis clock changes nothing), or for a customer token with its refresh token
(``Token.keep_until``); a back-off is the wall-clock ``retry_at`` as text,
expiring at ``retry_at`` the same way. The lock is ``SET {K}:lock <owner> NX PX <lease>``;
only its owner may renew (``PEXPIRE``) or release it (Lua compare-and-delete).

Event loops and fork: see ``_redis_loops`` (one built client per loop; in a forked
child the parent's connections are detached, never closed).

Failure model. A failover may lose the last writes to the old primary (Redis
replication is asynchronous): a lost token costs one extra fetch, a lost release or a
lock copied to the new primary costs at most one lease, and a lost back-off lets one
more request through. A lost delete may bring back, for the rest of its life, a token
deleted moments before (after a 401, or a revoke); the manager's 401 path deletes it
again. No failover makes a process serve a token that was not issued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from .._clock import Clock, SystemClock
from .._errors import BackendError, ConfigurationError
from .._token import Token
from ._base import BackendURL, LockHandle, TokenBackend
from ._codec import EncryptionKey, make_codec
from ._redis_loops import CLUSTER_HINT, Bound, LoopClients
from ._redis_push import Listener, channel_for
from ._redis_urls import SCHEMES, RedisTarget, build_client, parse_redis_url

if TYPE_CHECKING:
    from ._redis_urls import RedisClient

__all__ = ["RedisBackend"]

_INSTALL = "the Redis backend needs the redis package: pip install 'cl-tokens[redis]'"
_DIGEST_LEN = 64
_SEPARATOR = b"|"

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

_RENEW_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# PUBLISH is pcall'd in both scripts: a user whose ACL grants no channels (the default
# for new users since Redis 7) still writes and releases, and its waiters poll.
# A release wakes the waiters (an empty message: "no token, try the lock again"), so a
# holder that failed does not leave them waiting for the lease. ARGV[2] '' (a Cluster,
# whose waiters poll) publishes nothing.
_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[2] ~= '' then
        redis.pcall('PUBLISH', ARGV[2], '')
    end
    return 1
end
return 0
"""

# The first round trip of the cold path: the token (unless its digest is ARGV[3], the
# one being replaced), else the lock, with the back-off read in the same trip. Reply
# {1, value} | {2, backoff or ''} (lock taken) | {0, backoff or ''} (held by another).
# Idempotent for its owner like _ACQUIRE: a resent script finds its own lock.
_GET_OR_LOCK = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, 64) ~= ARGV[3] then
    return {1, value}
end
local backoff = redis.call('GET', KEYS[3]) or ''
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {2, backoff}
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
    return {2, backoff}
end
return {0, backoff}
"""

# The second round trip: write (or delete, ARGV[2] <= 0: already expired), release if
# still the owner, and publish the stored bytes to the waiters. Resending it is
# harmless: the same value, a no-op release, one more identical message.
_SET_AND_RELEASE = """
if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
    redis.call('DEL', KEYS[1])
end
if redis.call('GET', KEYS[2]) == ARGV[3] then
    redis.call('DEL', KEYS[2])
end
if ARGV[4] ~= '' then
    local message = ARGV[1]
    if tonumber(ARGV[2]) <= 0 then
        message = ''
    end
    redis.pcall('PUBLISH', ARGV[4], message)
end
return 1
"""

# What a waiter looks at: the token, and how long its lock has left (-2: none, so the
# holder released or died and the lock is to be taken).
_PEEK = """
return {redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[2])}
"""

_SCRIPTS = {
    "peek": _PEEK,
    "delete_if_digest": _DELETE_IF_DIGEST,
    "acquire": _ACQUIRE,
    "renew": _RENEW_IF_OWNER,
    "release": _RELEASE_IF_OWNER,
    "get_or_lock": _GET_OR_LOCK,
    "set_and_release": _SET_AND_RELEASE,
}
#: A back-off read by ``get_or_lock`` is answered from memory by the ``get_backoff``
#: that follows it (the manager's next step) for this long, saving it a round trip.
_BACKOFF_MEMO = 1.0
#: How often a waiter re-reads the key: with push as a safety net, without as its poll.
_RECHECK_PUSHED = 1.0
_POLL_MIN = 0.1

# Releases started for cancelled lock attempts: held here so they are not collected
# before they finish. (A failed release is retried by the manager, in _shared.)
_RELEASES: set[asyncio.Future[None]] = set()


def _digest(access_token: str) -> str:
    return hashlib.sha256(access_token.encode()).hexdigest()


def _token_key(key: str) -> str:
    return "{" + key + "}"


def _lock_key(key: str) -> str:
    return "{" + key + "}:lock"


def _backoff_key(key: str) -> str:
    return "{" + key + "}:backoff"


class RedisBackend(TokenBackend):
    """Tokens in Redis, Redis Cluster or a Sentinel-managed Redis, shared by every process
    that can reach it.

    Give either a client or a URL. A client you pass stays yours: ``aclose`` does not
    close it (see the module docstring for what happens to it on a new event loop or
    after ``fork``). Any redis-py asyncio client works: ``Redis``, ``RedisCluster``
    (initialized or not: the backend initializes it once, before its first concurrent
    command), or ``Sentinel(...).master_for(service)``. A client built from ``url`` gets
    short timeouts and a single quick retry, so a dead Redis fails in about
    ``socket_timeout`` seconds instead of stalling the token path; options in the URL's
    query (``?socket_timeout=3``) win over these.

    URLs (a password may hold raw ``/ ? # @``; percent-encode ``%``, and the others too
    to be unambiguous)::

        redis://[user:password@]host[:port][/db]            one server (rediss:// for TLS)
        redis+cluster://[user:password@]h1:p1[,h2:p2...]    Redis Cluster, seed nodes
        redis+sentinel://[user:password@]s1:p1[,s2:p2...]/<service>[/<db>]
                                                            the primary that Sentinel names

    with ``rediss+cluster://`` and ``rediss+sentinel://`` for TLS. A ``redis://`` URL
    that reaches a Cluster node fails at first use with a message that says to use
    ``redis+cluster://``. Secrets other than the Redis password (``encryption_key``) are
    arguments, never part of the URL.

    Args:
        client: a redis-py asyncio client to use as is.
        url: where to connect, when no ``client`` is given.
        encryption_key: a Fernet key, or a list of them (the first encrypts), to store
            tokens encrypted; needs ``pip install 'cl-tokens[encryption]'``.
        socket_timeout: seconds to wait to connect and for each reply (built client).
        clock: where "now" comes from for expiry (default: the system clock).
        **client_options: more keyword arguments for the built client (``retry``,
            ``ssl_ca_certs``, ``max_connections``...).

    Raises:
        ConfigurationError: the redis package is missing, both or neither of ``client``
            and ``url`` are given, or the URL is not one of the above (a Cluster URL
            with a database other than 0, a Sentinel URL without a service...).
    """

    schemes = SCHEMES

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
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise ConfigurationError(_INSTALL) from None
        self._injected: Any = None
        self._target: RedisTarget | None = None
        if client is not None and url is None:
            if client_options:
                raise ConfigurationError(
                    f"client options ({', '.join(sorted(client_options))}) apply only to a "
                    "client built from url="
                )
            self._injected = client
            self._where = f"client={type(client).__name__}"
        elif url is not None and client is None:
            self._target = parse_redis_url(url)
            self._where = f"url={self._target.safe!r}"
        else:
            raise ConfigurationError("RedisBackend takes a client or a url: exactly one of them")
        self._codec = make_codec(encryption_key)
        self._clock: Clock = clock or SystemClock()
        build = None
        if self._target is not None:
            build = partial(build_client, self._target, socket_timeout, client_options)
        # Bad options fail here, as a ConfigurationError, not at first use.
        self._clients = LoopClients(
            injected=self._injected, build=build, where=self._where, scripts=_SCRIPTS
        )
        # key -> (retry_at or None, monotonic time read), see _BACKOFF_MEMO.
        self._backoff_memo: dict[str, tuple[float | None, float]] = {}

    @classmethod
    def from_url(cls, url: BackendURL, **options: Any) -> RedisBackend:
        """Build from any of the URLs in the class docstring.

        Args:
            url: the parsed URL (``url.raw`` is parsed again here: urllib cannot read a
                list of hosts).
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
        """The Redis client in use on the running event loop (or the last one used)."""
        with self._wrap_errors("bind to this event loop", "the backend"):
            return self._clients.current()  # type: ignore[no-any-return]

    async def connect(self) -> None:
        """Connect now (and initialize a Cluster client) instead of at the first call,
        which otherwise pays for it: a Cluster client reads the server's COMMAND table
        (about 0.2 s; seconds on a loaded machine). Optional; safe to call again."""
        with self._wrap_errors("connect to", self._where):
            await self._clients.use()

    @contextlib.asynccontextmanager
    async def _command(self, action: str, key: str) -> AsyncIterator[Bound]:
        """The client for this loop, for one command: errors wrapped, and no more
        commands in flight than the client has connections (redis-py 8 raises
        MaxConnectionsError past them, where it could wait)."""
        with self._wrap_errors(action, key):
            bound = await self._clients.use()
            if bound.limit is None:
                yield bound
            else:
                async with bound.limit:
                    yield bound

    # -- errors ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _wrap_errors(self, action: str, key: str) -> Iterator[None]:
        """Every failure of the client becomes BackendError (cause kept): Redis errors,
        sockets, timeouts, and the RuntimeError or AttributeError of a client caught on
        the wrong loop or half initialized."""
        try:
            yield
        except BackendError:
            raise
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            password = self._target.password if self._target is not None else None
            if password:
                text = text.replace(password, "***")
            if text.startswith(("MovedError", "AskError")) or " MOVED " in f" {exc} ":
                text += f" ({CLUSTER_HINT})"
            raise BackendError(f"Redis could not {action} {key}: {text}") from exc

    # -- tokens -------------------------------------------------------------------------------

    def _decode(self, raw: bytes | str) -> Token | None:
        # A client made with decode_responses=True hands back str; the value is ASCII.
        data = raw.encode() if isinstance(raw, str) else raw
        if data[_DIGEST_LEN : _DIGEST_LEN + 1] != _SEPARATOR:
            return None
        return self._codec.decode(data[_DIGEST_LEN + 1 :])

    async def get(self, key: str) -> Token | None:
        async with self._command("read", key) as bound:
            raw = await bound.client.get(_token_key(key))
        if raw is None:
            return None
        token = self._decode(raw)
        if token is None or token.keep_until <= self._clock.time():
            return None
        return token

    async def set(self, key: str, token: Token) -> None:
        value, ttl_ms = self._stored(token)
        async with self._command("write", key) as bound:
            if ttl_ms <= 0:
                # Storing an expired token means holding none (as a later get would say).
                await bound.client.delete(_token_key(key))
            else:
                await bound.client.set(_token_key(key), value, px=ttl_ms)

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        async with self._command("delete", key) as bound:
            if access_token is None:
                deleted = await bound.client.delete(_token_key(key))
            else:
                deleted = await bound.scripts["delete_if_digest"](
                    keys=[_token_key(key)], args=[_digest(access_token)]
                )
        return bool(deleted)

    # -- back-off -------------------------------------------------------------------------

    async def get_backoff(self, key: str) -> float | None:
        memo = self._backoff_memo.pop(key, None)
        if memo is not None and time.monotonic() - memo[1] < _BACKOFF_MEMO:
            retry_at = memo[0]
            return retry_at if retry_at is not None and retry_at > self._clock.time() else None
        async with self._command("read the back-off of", key) as bound:
            raw = await bound.client.get(_backoff_key(key))
        return self._parse_backoff(raw)

    def _parse_backoff(self, raw: Any) -> float | None:
        if raw is None or raw in (b"", ""):
            return None
        try:
            retry_at = float(raw)
        except (TypeError, ValueError, OverflowError):
            return None  # junk is no back-off
        if not math.isfinite(retry_at) or retry_at <= self._clock.time():
            return None
        return retry_at

    async def set_backoff(self, key: str, retry_at: float) -> None:
        if not math.isfinite(retry_at):
            raise BackendError(f"a back-off must end at a finite time, not {retry_at!r}")
        ttl_ms = _ms_until(retry_at, self._clock.time())
        self._backoff_memo.pop(key, None)
        async with self._command("write the back-off of", key) as bound:
            if ttl_ms <= 0:
                await bound.client.delete(_backoff_key(key))
            else:
                await bound.client.set(_backoff_key(key), repr(float(retry_at)), px=ttl_ms)

    # -- locks ----------------------------------------------------------------------------

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        owner = secrets.token_hex(16)
        handle = LockHandle(key, owner)
        try:
            async with self._command("lock", key) as bound:
                taken = await bound.scripts["acquire"](
                    keys=[_lock_key(key)], args=[owner, _lease_ms(lease)]
                )
        except asyncio.CancelledError:
            # The SET may have reached Redis before the cancellation: release by owner
            # (a no-op if it did not), or the lock would block others for its lease.
            self._release_in_background(handle)
            raise
        return handle if taken else None

    async def renew_lock(self, handle: LockHandle, *, lease: float) -> bool:
        """Extend the lock to ``lease`` seconds from now, only if ``handle`` still owns it."""
        async with self._command("renew the lock on", handle.key) as bound:
            renewed = await bound.scripts["renew"](
                keys=[_lock_key(handle.key)], args=[handle.owner, _lease_ms(lease)]
            )
        return bool(renewed)

    async def _release_quietly(self, handle: LockHandle) -> None:
        # Best effort, in the background: a lock left behind expires with its lease.
        with contextlib.suppress(Exception):
            await self._release(handle)

    async def release_lock(self, handle: LockHandle) -> None:
        await self._release(handle)

    async def _release(self, handle: LockHandle) -> None:
        async with self._command("unlock", handle.key) as bound:
            await bound.scripts["release"](
                keys=[_lock_key(handle.key)], args=[handle.owner, _channel(bound, handle.key)]
            )

    # -- the cold path in two round trips, and push wake-ups ---------------------------

    async def get_or_lock(
        self, key: str, *, lease: float, refuse: str | None = None
    ) -> Token | LockHandle | None:
        owner = secrets.token_hex(16)
        handle = LockHandle(key, owner)
        refused = _digest(refuse) if refuse is not None else ""
        try:
            async with self._command("read or lock", key) as bound:
                kind, payload = await bound.scripts["get_or_lock"](
                    keys=[_token_key(key), _lock_key(key), _backoff_key(key)],
                    args=[owner, _lease_ms(lease), refused],
                )
        except asyncio.CancelledError:
            self._release_in_background(handle)  # as in acquire_lock
            raise
        if int(kind) == 1:
            token = self._usable(payload, refuse)
            if token is not None:
                return token
            # Stored but not usable by our clock, or unreadable: as if missing.
            return await self.acquire_lock(key, lease=lease)
        if int(kind) != 2:
            return None
        if len(self._backoff_memo) > 1024:
            self._backoff_memo.clear()
        self._backoff_memo[key] = (self._parse_backoff(payload), time.monotonic())
        return handle

    def _usable(self, raw: bytes | str | None, refuse: str | None) -> Token | None:
        if not raw:
            return None
        token = self._decode(raw)
        if token is None or token.keep_until <= self._clock.time():
            return None
        if refuse is not None and token.access_token == refuse:
            return None
        return token

    def _stored(self, token: Token) -> tuple[bytes, int]:
        """The value stored for ``token`` and its time to live in ms (<= 0: expired)."""
        value = _digest(token.access_token).encode() + _SEPARATOR + self._codec.encode(token)
        # Kept while its refresh token lives, for a customer token (``keep_until``).
        return value, _ms_until(token.keep_until, self._clock.time())

    async def set_and_release(self, key: str, token: Token, handle: LockHandle) -> None:
        value, ttl_ms = self._stored(token)
        async with self._command("write and unlock", key) as bound:
            await bound.scripts["set_and_release"](
                keys=[_token_key(key), _lock_key(key)],
                args=[value, ttl_ms, handle.owner, _channel(bound, key)],
            )

    async def wait_for(
        self, key: str, *, timeout: float, refuse: str | None = None, poll: float = 0.05
    ) -> Token | None:
        """Wait for the write of ``key``: woken by its publish (which carries the value);
        None at once when the lock is free (released without a token: a failed holder
        publishes that too; or its lease ran out, a dead holder: the wait ends when it
        does). Re-reads the key every second as a safety net, or every
        ``max(poll, 0.1)`` s without pub/sub (a Redis Cluster client, a user without
        channel rights, a connection lost)."""
        deadline = time.monotonic() + timeout
        async with self._command("wait for", key) as bound:
            listener = None if bound.cluster else _listener(bound)
        channel = channel_for(key)
        while True:
            future = None
            if listener is not None:
                with self._wrap_errors("subscribe for", key):
                    future = await listener.watch(channel, max(0.0, deadline - time.monotonic()))
            try:
                # Read after subscribing: a write in between is still pushed to us.
                token, lock_left = await self._peek(key, refuse)
                if token is not None:
                    return token
                left = deadline - time.monotonic()
                if left <= 0 or lock_left is None:
                    return None
                pause = min(left, lock_left + 0.001)
                if future is None:
                    await asyncio.sleep(min(pause, max(poll, _POLL_MIN)))
                    continue
                done, _ = await asyncio.wait((future,), timeout=min(pause, _RECHECK_PUSHED))
            finally:
                if future is not None:
                    listener.unwatch(channel, future)  # type: ignore[union-attr]
            if not done:
                continue
            message = future.result()
            if not message:
                return None  # released without a token: take the lock again
            token = self._usable(message, refuse)
            if token is not None:
                return token

    async def _peek(self, key: str, refuse: str | None) -> tuple[Token | None, float | None]:
        """The usable token under ``key`` (not ``refuse``), and the seconds left on its
        lock (None: not locked), in one round trip."""
        async with self._command("read", key) as bound:
            raw, pttl = await bound.scripts["peek"](keys=[_token_key(key), _lock_key(key)], args=[])
        pttl = int(pttl)
        return self._usable(raw, refuse), (pttl / 1000 if pttl >= 0 else None)

    def _release_in_background(self, handle: LockHandle) -> None:
        release = asyncio.ensure_future(self._release_quietly(handle))
        _RELEASES.add(release)
        release.add_done_callback(_RELEASES.discard)

    # -- lifecycle ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the clients this backend built (never an injected one); the backend
        may still be used afterwards, and builds a new one."""
        with self._wrap_errors("close the connection for", "the backend"):
            await self._clients.aclose()


def _ms_until(when: float, now: float) -> int:
    return math.ceil((when - now) * 1000) if when - now < 1e12 else 10**15


def _channel(bound: Bound, key: str) -> str:
    """Where writes of ``key`` are announced; none on a Cluster, whose waiters poll."""
    return "" if bound.cluster else channel_for(key)


def _listener(bound: Bound) -> Listener:
    if bound.listener is None:
        bound.listener = Listener(bound.client)
    return bound.listener  # type: ignore[no-any-return]


def _lease_ms(lease: float) -> int:
    if not math.isfinite(lease) or lease <= 0:
        raise BackendError(f"a lock lease must be a positive number of seconds, not {lease!r}")
    return max(1, int(lease * 1000))
