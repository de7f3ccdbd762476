"""The shared-cache strategy: the ``TokenBackend`` base class, its URL registry and factory.

A backend stores tokens under opaque keys (``cl_tokens:v2:<hmac>``, never a secret),
deletes one only if it still holds a given access token, and offers a cross-process
lock with a lease. To add one (memcached, a database...): subclass ``TokenBackend``,
set ``schemes``, implement the five abstract methods, and run the contract suite
(``cl_tokens.testing.backend_contract``) against it. A distribution makes its schemes
known to ``backend_from_url`` (and so to ``CL_TOKEN_BACKEND``) through the entry-point
group ``cl_tokens.backends``: ``mystore = "my_package.backend:MyStoreBackend"``. Such
a class is imported only when a URL with its scheme is first used; a scheme that is
already registered (the bundled ``memory``, ``file``, ``redis``...) is never looked up.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .._errors import BackendError, ConfigurationError
from .._token import Token

if TYPE_CHECKING:
    import importlib.metadata

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendURL",
    "LockHandle",
    "TokenBackend",
    "backend_from_url",
    "known_schemes",
    "redact_url",
    "split_userinfo",
]

_REGISTRY: dict[str, type[TokenBackend]] = {}
#: The bundled backends that ``import cl_tokens`` does not import (the file backend's
#: locking and the Redis client cost import time that most users never need): each
#: module is imported when a URL with one of its schemes is first used, and its classes
#: register themselves. tests/test_lazy_imports.py checks this table against their
#: ``schemes``.
_BUNDLED: dict[str, str] = {
    "file": "._file",
    **dict.fromkeys(
        (
            "redis",
            "rediss",
            "redis+cluster",
            "rediss+cluster",
            "redis+sentinel",
            "rediss+sentinel",
        ),
        "._redis",
    ),
}
#: Where third-party distributions declare their backends' URL schemes.
ENTRY_POINT_GROUP = "cl_tokens.backends"
_B = TypeVar("_B", bound="TokenBackend")


@dataclass(frozen=True)
class BackendURL:
    """A backend URL parsed once: ``scheme://user:password@host:port/path?query``.

    ``raw`` is the URL as given, except that its userinfo is percent-encoded: a password
    with ``/``, ``#``, ``?`` or ``@`` then reaches a client that parses ``raw`` again
    whole, instead of cutting the host short. Neither ``raw`` nor the password shows
    in ``repr``.
    """

    raw: str = field(repr=False)
    scheme: str
    host: str | None
    port: int | None
    path: str
    username: str | None
    password: str | None = field(repr=False)
    query: dict[str, str]

    @classmethod
    def parse(cls, url: str) -> BackendURL:
        """Parse ``url``; the userinfo is everything between ``://`` and the last ``@``
        (see ``split_userinfo``), so a password with ``/``, ``#`` or ``?`` stays whole.

        Raises:
            ConfigurationError: the URL does not parse (the message never echoes it).
        """
        try:
            scheme, userinfo, rest = split_userinfo(url)
            parts = urlsplit(f"{scheme}://{rest}")
        except ValueError:
            raise ConfigurationError(f"backend URL is not a valid URL: {redact_url(url)}") from None
        try:
            _check_ports(parts.netloc)
        except ValueError:
            raise ConfigurationError(f"backend URL is not a valid URL: {redact_url(url)}") from None
        # Several hosts (redis+cluster://h1:p1,h2:p2) have no one port; the backend
        # parses ``raw`` itself.
        port = None if "," in parts.netloc else parts.port
        username = password = None
        raw = url
        if userinfo is not None:
            name, colon, secret = userinfo.partition(":")
            username = unquote(name) or None
            password = unquote(secret) if colon and secret else None
            # Percent-encoded, so a client that parses ``raw`` again with urlsplit
            # (redis-py's from_url) reads the same user, password and host as here.
            raw = f"{scheme}://{_reencode(name)}{':' + _reencode(secret) if colon else ''}@{rest}"
        return cls(
            raw=raw,
            scheme=scheme.lower(),
            host=parts.hostname,
            port=port,
            path=unquote(parts.path),
            username=username,
            password=password,
            query=dict(parse_qsl(parts.query)),
        )


def _check_ports(netloc: str) -> None:
    """Raise ValueError unless each host of ``netloc`` (one, or several separated by
    commas, as in ``redis+cluster://h1:7000,h2:7000``) has a valid port or none."""
    for host in netloc.split(","):
        urlsplit(f"//{host}").port  # noqa: B018 - parsing the port is the check


def _reencode(part: str) -> str:
    """``part`` of a userinfo percent-encoded; an already encoded one is unchanged."""
    return quote(unquote(part, errors="surrogateescape"), safe="", errors="surrogateescape")


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")


def split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``url`` as (scheme, userinfo or None, the rest: host, port, path, query...).

    The userinfo is everything between ``://`` and the *last* ``@``, whatever it holds:
    generated passwords contain ``/``, ``#`` and ``?``, which ``urlsplit`` would take
    for the end of the host and so show part of the password as a path. When an ``@``
    is in a path or query instead, more is taken as userinfo than was: a redaction
    then hides too much, never too little.

    Raises:
        ValueError: ``url`` is not ``scheme://...`` (the message never echoes it).
    """
    if not isinstance(url, str):
        raise ValueError("a URL must be a string")
    scheme, sep, rest = url.partition("://")
    if not sep or _SCHEME.fullmatch(scheme) is None:
        raise ValueError("not a scheme://... URL")
    at = rest.rfind("@")
    if at < 0:
        return scheme, None, rest
    return scheme, rest[:at], rest[at + 1 :]


def redact_url(url: str) -> str:
    """``url`` fit for messages and repr: the password, every query value (redis-py
    takes ``?password=``) and any fragment replaced by ``***``.

    The userinfo is found as ``split_userinfo`` does, so no character in a password
    can push part of it out of the redaction. A URL that does not parse at all is shown
    as ``<unparseable URL>``, never echoed: it may be a secret pasted in the wrong place.
    """
    try:
        scheme, userinfo, rest = split_userinfo(url)
        parts = urlsplit(f"{scheme}://{rest}")
        _check_ports(parts.netloc)
    except ValueError:
        return "<unparseable URL>"
    user = ""
    if userinfo is not None:
        name, colon, _ = userinfo.partition(":")
        user = f"{name}:***@" if colon else f"{name}@"
    query = "&".join(f"{name}=***" for name, _ in parse_qsl(parts.query, True))
    # Built by hand: urlunsplit drops the "//" of schemes it does not know (memory://).
    return (
        f"{scheme}://{user}{parts.netloc}{parts.path}"
        + (f"?{query}" if query else ("?***" if parts.query else ""))
        + ("#***" if parts.fragment else "")
    )


@dataclass(frozen=True)
class LockHandle:
    """Proof of holding a backend lock: the key and a random owner value.

    Attributes:
        key: the cache key the lock guards.
        owner: a random value only this holder knows; release checks it.
        extra: free for a third-party backend to carry what its release needs (a
            connection, a fencing token); the bundled backends leave it None.
    """

    key: str
    owner: str
    extra: Any = field(default=None, compare=False)


class TokenBackend(ABC):
    """Where tokens are shared between managers, processes and machines.

    Subclasses implement ``get``, ``set``, ``delete``, ``acquire_lock`` and
    ``release_lock`` (and ``aclose`` if they hold resources), and list their URL schemes
    in ``schemes`` to be built by ``backend_from_url``. Each method raises
    ``BackendError`` (keeping the original as ``__cause__``) when the store fails; a
    miss is ``None``, never an error.
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for scheme in cls.__dict__.get("schemes", ()):
            _REGISTRY[scheme] = cls

    @classmethod
    def from_url(cls, url: BackendURL, **options: Any) -> TokenBackend:
        """Build the backend from a parsed URL; subclasses with ``schemes`` override it."""
        raise ConfigurationError(f"{cls.__name__} cannot be built from a URL")

    @abstractmethod
    async def get(self, key: str) -> Token | None:
        """The token stored under ``key``, or None (missing, expired or unreadable)."""

    @abstractmethod
    async def set(self, key: str, token: Token) -> None:
        """Store ``token`` under ``key`` until ``token.expires_at``."""

    @abstractmethod
    async def delete(self, key: str, access_token: str | None = None) -> bool:
        """Delete ``key``; with ``access_token``, only if it still holds that token.

        Returns whether something was deleted.
        """

    @abstractmethod
    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        """Try once, without waiting, to take the lock on ``key`` for ``lease`` seconds.

        Returns a handle, or None if another holder has it.
        """

    @abstractmethod
    async def release_lock(self, handle: LockHandle) -> None:
        """Release a lock taken by ``acquire_lock``, only if this holder still owns it."""

    async def renew_lock(self, handle: LockHandle, *, lease: float) -> bool:
        """Extend a held lock to ``lease`` seconds from now; False if it is no longer ours.

        The manager takes short leases and renews them while its fetch runs, so a lock
        orphaned by a dead holder or a failover costs one lease, not a long wait. A
        backend whose locks die with their holder (file locks) needs no renewal.
        """
        return True

    async def get_backoff(self, key: str) -> float | None:
        """The wall-clock time before which no process may request a token for ``key``.

        None when no back-off is in force. A back-off is written after a 429 or a fetch
        whose attempts all failed, so that every process and machine sharing the store
        waits it out. A backend that does not override this keeps back-offs in-process.
        """
        return None

    async def set_backoff(self, key: str, retry_at: float) -> None:  # noqa: B027
        """Record that no token request for ``key`` may be sent before ``retry_at``
        (wall clock, seconds since the epoch); the record expires at ``retry_at``."""

    # The cold path in few round trips. The defaults compose the primitives above, so a
    # third-party backend works unchanged; a bundled backend overrides them to do each
    # step in one round trip (a Redis script, one thread hop) and to wake waiters by push.

    #: False for a backend whose calls never block the loop and cannot hang (the
    #: in-process memory backend): the manager calls it directly, without a timeout.
    blocking: ClassVar[bool] = True

    async def get_or_lock(
        self, key: str, *, lease: float, refuse: str | None = None
    ) -> Token | LockHandle | None:
        """The stored token, else the lock on ``key`` for ``lease`` seconds, else None.

        A stored token whose access token is ``refuse`` (the one being refreshed, or
        one the API rejected) counts as absent. None means another holder has the lock
        and no usable token is stored: wait with ``wait_for``.
        """
        token = await self.get(key)
        if token is not None and token.access_token != refuse:
            return token
        return await self.acquire_lock(key, lease=lease)

    async def set_and_release(self, key: str, token: Token, handle: LockHandle) -> None:
        """Store ``token`` under ``key``, then release ``handle`` (and wake the waiters
        of ``wait_for``). The lock is released even if the write fails."""
        try:
            await self.set(key, token)
        finally:
            await self.release_lock(handle)

    async def wait_for(
        self, key: str, *, timeout: float, refuse: str | None = None, poll: float = 0.05
    ) -> Token | None:
        """Wait up to ``timeout`` seconds for a token under ``key`` other than ``refuse``.

        Returns it as soon as it is seen; None when the time is up (the holder may have
        released the lock without writing: call ``get_or_lock`` again). This default
        polls ``get`` every ``poll`` seconds (with jitter); backends that can be woken by
        the write (pub/sub, inotify, an in-process event) override it. Never blocks the
        loop; cancellable.
        """
        deadline = time.monotonic() + timeout
        while True:
            token = await self.get(key)
            if token is not None and token.access_token != refuse:
                return token
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(left, poll * random.uniform(0.5, 1.5)))  # noqa: S311

    async def connect(self) -> None:  # noqa: B027 - a backend without connections needs none
        """Connect now, on the running loop, instead of during the first call.

        The manager calls it once per event loop before its first call to the backend,
        allowing it several times ``backend_timeout``: a slow first connection (a
        Cluster client reading the slot map) is then not taken for an outage.
        """

    async def aclose(self) -> None:  # noqa: B027 - a backend without resources needs none
        """Release the backend's resources (connections, file handles)."""

    @asynccontextmanager
    async def lock(
        self, key: str, *, lease: float = 60.0, timeout: float = 31.0, poll: float = 0.01
    ) -> AsyncIterator[LockHandle]:
        """Hold the lock on ``key``: wait up to ``timeout`` seconds for it.

        Raises ``BackendError`` if it does not come in time. Waiting polls
        ``acquire_lock`` every ``poll`` seconds (with jitter) and never blocks the loop.
        """
        deadline = time.monotonic() + timeout
        while True:
            handle = await self.acquire_lock(key, lease=lease)
            if handle is not None:
                break
            if time.monotonic() >= deadline:
                raise BackendError(f"timed out after {timeout:g} s waiting for the lock on {key}")
            await asyncio.sleep(poll * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
        try:
            yield handle
        finally:
            await self.release_lock(handle)

    async def __aenter__(self: _B) -> _B:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def known_schemes() -> list[str]:
    """Every URL scheme ``backend_from_url`` takes, sorted: the registered ones and
    those that installed distributions declare in ``cl_tokens.backends``."""
    return sorted(set(_REGISTRY) | set(_BUNDLED) | set(_declared_schemes()))


@functools.lru_cache(maxsize=1)
def _declared_schemes() -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points of ``ENTRY_POINT_GROUP`` by scheme, not loaded.

    Read once per process (``Settings`` asks for the schemes every time it checks a
    URL); ``_declared_schemes.cache_clear()`` rereads them.
    """
    import importlib.metadata

    try:
        declared = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # one broken distribution's metadata must not break the bundled ones
        return {}
    return {entry.name.strip().lower(): entry for entry in declared if entry.name.strip()}


def _load_bundled(scheme: str) -> type[TokenBackend] | None:
    """The bundled backend class for ``scheme``, its module imported now; None when no
    bundled backend takes it."""
    module = _BUNDLED.get(scheme)
    if module is None:
        return None
    importlib.import_module(module, __package__)
    return _REGISTRY.get(scheme)


def _load_declared(scheme: str) -> type[TokenBackend] | None:
    """The backend class a distribution declares for ``scheme``, imported now; None
    when none does.

    Raises:
        ConfigurationError: the entry point fails to load or is not a TokenBackend.
    """
    entry = _declared_schemes().get(scheme)
    if entry is None:
        return None
    dist = getattr(entry, "dist", None)
    origin = f"{entry.value!r}" + (f" of the distribution {dist.name!r}" if dist else "")
    try:
        loaded = entry.load()
    except Exception as exc:
        raise ConfigurationError(
            f"backend scheme {scheme!r}: {origin} (entry point group {ENTRY_POINT_GROUP}) "
            f"failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(loaded, type) and issubclass(loaded, TokenBackend)):
        raise ConfigurationError(
            f"backend scheme {scheme!r}: {origin} (entry point group {ENTRY_POINT_GROUP}) "
            "is not a TokenBackend subclass"
        )
    # Importing it registered its own ``schemes``; the declared name is one of them
    # even if the class does not list it.
    _REGISTRY.setdefault(scheme, loaded)
    return _REGISTRY[scheme]


def backend_from_url(url: str, **options: Any) -> TokenBackend:
    """Build a backend from a URL such as ``memory://``, ``file:///var/cache/cl-tokens``
    or ``redis://localhost:6379/0``.

    A scheme no bundled backend takes is looked up in the entry-point group
    ``cl_tokens.backends`` of the installed distributions.

    Raises:
        ConfigurationError: the URL is not a string, or its scheme is unknown (the
            message lists the known ones), or a declared backend fails to load.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"backend must be a URL such as memory://, file:///path or redis://host:6379/0, "
            f"not {redact_url(url) if isinstance(url, str) else type(url).__name__!r}"
        )
    try:
        parsed = BackendURL.parse(url)
    except ValueError as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"backend URL is not a valid URL: {redact_url(url)}") from None
    cls = (
        _REGISTRY.get(parsed.scheme)
        or _load_bundled(parsed.scheme)
        or _load_declared(parsed.scheme)
    )
    if cls is None:
        raise ConfigurationError(
            f"unknown backend scheme {parsed.scheme!r} in {redact_url(url)!r}; "
            f"known schemes: {', '.join(known_schemes())}"
        )
    try:
        return cls.from_url(parsed, **options)
    except ValueError as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(
            f"invalid backend URL {redact_url(url)!r}: {type(exc).__name__}"
        ) from None
