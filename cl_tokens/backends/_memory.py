"""The in-process backend: a dict, shared by every manager given the same instance."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from .._clock import Clock, SystemClock
from .._errors import ConfigurationError
from .._token import Token
from ._base import BackendURL, LockHandle, TokenBackend

__all__ = ["MemoryBackend"]


class MemoryBackend(TokenBackend):
    """Tokens in a dict of this process.

    One instance passed to several managers is shared by them (keys keep them apart);
    the URL ``memory://`` makes a private one per manager. Locks are in-process and
    expire after their lease like the shared backends' do. Nothing here blocks or
    waits on I/O (``blocking = False``): the manager awaits it directly, without the
    timeout it puts around other backends. A waiter of ``wait_for`` is woken by the
    write, the release or the delete of its key, never by polling.

    Args:
        clock: where "now" comes from for expiry (default: the system clock).
    """

    schemes = ("memory",)
    blocking = False

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or SystemClock()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._tokens: dict[str, Token] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._backoffs: dict[str, float] = {}
        self._next_sweep = 0.0

    @classmethod
    def from_url(cls, url: BackendURL, **options: Any) -> MemoryBackend:
        # Never echo the URL: "memory://user:secret@..." would put the secret in the
        # message, and memory:// has no use for any part of it.
        if "@" in url.raw:
            raise ConfigurationError("memory:// takes no credentials (nothing before an @)")
        if url.host or url.path not in ("", "/") or url.query:
            raise ConfigurationError("memory:// takes no host, path or options: use memory://")
        return cls(**options)

    def __repr__(self) -> str:
        return f"MemoryBackend(tokens={len(self._tokens)})"

    async def get(self, key: str) -> Token | None:
        token = self._tokens.get(key)
        if token is not None and token.keep_until <= self._clock.time():
            del self._tokens[key]
            return None
        return token

    async def set(self, key: str, token: Token) -> None:
        self._tokens[key] = token
        self._sweep()
        self._wake(key)

    def _wake(self, key: str) -> None:
        for future in self._waiters.pop(key, ()):
            if future.done():
                continue
            loop = future.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if loop is running:
                future.set_result(None)
            elif not loop.is_closed():  # a waiter on another thread's loop
                loop.call_soon_threadsafe(_resolve, future)

    async def wait_for(
        self, key: str, *, timeout: float, refuse: str | None = None, poll: float = 0.05
    ) -> Token | None:
        """Woken by the write, the release or the delete of ``key``; None at once when
        the lock is free (released without a write, or its lease ran out: the caller
        takes it). ``poll`` is unused."""
        deadline = time.monotonic() + timeout
        while True:
            token = await self.get(key)
            if token is not None and token.access_token != refuse:
                return token
            now = time.monotonic()
            held = self._locks.get(key)
            if now >= deadline or held is None or held[1] <= now:
                return None
            future = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, set()).add(future)
            try:
                await asyncio.wait((future,), timeout=min(deadline, held[1]) - now)
            finally:
                waiting = self._waiters.get(key)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiters[key]

    def _sweep(self) -> None:
        """Forget expired tokens, back-offs and leases, at most once a second: memory is
        bounded by what is live, not by every key ever written."""
        mono = time.monotonic()
        if mono < self._next_sweep:
            return
        self._next_sweep = mono + 1.0
        now = self._clock.time()
        for key in [k for k, t in self._tokens.items() if t.keep_until <= now]:
            del self._tokens[key]
        for key in [k for k, until in self._backoffs.items() if until <= now]:
            del self._backoffs[key]
        for key in [k for k, (_, until) in self._locks.items() if until <= mono]:
            del self._locks[key]

    async def get_backoff(self, key: str) -> float | None:
        retry_at = self._backoffs.get(key)
        if retry_at is not None and retry_at <= self._clock.time():
            del self._backoffs[key]
            return None
        return retry_at

    async def set_backoff(self, key: str, retry_at: float) -> None:
        self._backoffs[key] = retry_at
        self._sweep()

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        token = self._tokens.get(key)
        if token is None or (access_token is not None and token.access_token != access_token):
            return False
        del self._tokens[key]
        self._wake(key)
        return True

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        now = time.monotonic()
        held = self._locks.get(key)
        if held is not None and held[1] > now:
            return None
        owner = secrets.token_hex(8)
        self._locks[key] = (owner, now + lease)
        self._sweep()
        return LockHandle(key, owner)

    async def renew_lock(self, handle: LockHandle, *, lease: float) -> bool:
        held = self._locks.get(handle.key)
        now = time.monotonic()
        if held is None or held[0] != handle.owner or held[1] <= now:
            return False
        self._locks[handle.key] = (handle.owner, now + lease)
        return True

    async def release_lock(self, handle: LockHandle) -> None:
        held = self._locks.get(handle.key)
        if held is not None and held[0] == handle.owner:
            del self._locks[handle.key]
            self._wake(handle.key)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
