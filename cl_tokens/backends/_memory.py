"""The in-process backend: a dict, shared by every manager given the same instance."""

from __future__ import annotations

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
    expire after their lease like the shared backends' do.

    Args:
        clock: where "now" comes from for expiry (default: the system clock).
    """

    schemes = ("memory",)

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or SystemClock()
        self._tokens: dict[str, Token] = {}
        self._locks: dict[str, tuple[str, float]] = {}

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
        if token is not None and token.expires_at <= self._clock.time():
            del self._tokens[key]
            return None
        return token

    async def set(self, key: str, token: Token) -> None:
        self._tokens[key] = token

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        token = self._tokens.get(key)
        if token is None or (access_token is not None and token.access_token != access_token):
            return False
        del self._tokens[key]
        return True

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        now = time.monotonic()
        held = self._locks.get(key)
        if held is not None and held[1] > now:
            return None
        owner = secrets.token_hex(8)
        self._locks[key] = (owner, now + lease)
        return LockHandle(key, owner)

    async def release_lock(self, handle: LockHandle) -> None:
        held = self._locks.get(handle.key)
        if held is not None and held[0] == handle.owner:
            del self._locks[handle.key]
