"""The in-process tiers: tokens by cache key, and the hot tier that header() reads.

The memory tier holds one entry per cache key: the token, its timing, and the scope
arguments through which the hot tier serves it. The hot tier is two plain dicts keyed by
the scope argument as callers pass it, so a warm call is a dict lookup with no clock
read: an entry leaves the hot tier ("is retired") when a loop timer fires at its refresh
moment, or when ``sweep`` finds the wall clock past it (clock jumps, suspended
processes, injected clocks — what the timers cannot see).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from ._clock import Clock
from ._token import Token
from ._tuning import TokenTiming, Tuning, plan_token

__all__ = ["Entry", "MemoryTier", "ScopeArg"]

ScopeArg = str | None


@dataclass(eq=False)
class Entry:
    """A token in the memory tier, with its timing and the hot aliases that serve it."""

    token: Token
    timing: TokenTiming
    aliases: set[ScopeArg] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None
    refresh_not_before: float = 0.0  # monotonic


class MemoryTier:
    """Entries by cache key, and the hot dicts (``headers``, ``tokens``) read directly
    by the manager's hot path.

    Args:
        tuning: the margins and windows each token is planned with.
        clock: wall time for planning, monotonic time for refresh gaps.
        rng: draws each token's refresh jitter.
    """

    def __init__(self, tuning: Tuning, clock: Clock, rng: random.Random) -> None:
        self._tuning = tuning
        self._clock = clock
        self._rng = rng
        self.headers: dict[ScopeArg, str] = {}
        self.tokens: dict[ScopeArg, Token] = {}
        self._entries: dict[str, Entry] = {}
        self._pending: dict[str, set[ScopeArg]] = {}

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def await_flight(self, key: str, scope_arg: ScopeArg) -> None:
        """``scope_arg`` waits for the flight of ``key``: serve it hot what it installs."""
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = {scope_arg}
        else:
            pending.add(scope_arg)

    def install(self, key: str, token: Token) -> Token:
        """Make ``token`` the entry for ``key``, served hot until its refresh moment."""
        now = self._clock.time()
        old = self._entries.get(key)
        if old is not None and old.token.access_token == token.access_token:
            # The same token came back (Commerce Layer reissues only near expiry):
            # keep its timing, and wait the minimum gap before asking again.
            old.refresh_not_before = self._clock.monotonic() + old.timing.min_gap
            return old.token
        entry = Entry(token, plan_token(token, self._tuning, now, self._rng))
        aliases = self._pending.pop(key, set())
        if old is not None:
            aliases |= old.aliases
            self.drop(key)
        self._entries[key] = entry
        delay = entry.timing.refresh_at - now
        if delay > 0:
            entry.timer = asyncio.get_running_loop().call_later(delay, self.retire, entry)
            for alias in aliases:
                self.promote(alias, entry)
        return token

    def promote(self, scope_arg: ScopeArg, entry: Entry) -> None:
        """Serve ``entry`` on the hot path to callers passing ``scope_arg``."""
        entry.aliases.add(scope_arg)
        self.tokens[scope_arg] = entry.token
        self.headers[scope_arg] = entry.token.authorization

    def retire(self, entry: Entry) -> None:
        """Take ``entry`` off the hot tier: its next caller takes the slow path."""
        for alias in entry.aliases:
            if self.tokens.get(alias) is entry.token:
                del self.tokens[alias]
                del self.headers[alias]
        entry.aliases.clear()

    def drop(self, key: str) -> Entry | None:
        """Remove the entry for ``key`` from both tiers; returns it."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.retire(entry)
            if entry.timer is not None:
                entry.timer.cancel()
        return entry

    def sweep(self) -> None:
        """Retire every hot entry whose refresh moment the wall clock has passed."""
        now = self._clock.time()
        for entry in list(self._entries.values()):
            if entry.aliases and now >= entry.timing.refresh_at:
                self.retire(entry)

    def clear_hot(self) -> None:
        """Empty the hot tier (the memory tier keeps its tokens)."""
        self.headers.clear()
        self.tokens.clear()
        for entry in self._entries.values():
            entry.aliases.clear()

    def cancel_timers(self) -> None:
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None

    def rearm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Re-create every retirement timer on ``loop`` (the old loop's died with it)."""
        self.cancel_timers()
        now = self._clock.time()
        for entry in self._entries.values():
            delay = entry.timing.refresh_at - now
            if delay > 0:
                entry.timer = loop.call_later(delay, self.retire, entry)
