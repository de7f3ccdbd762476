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
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from ._clock import Clock
from ._token import Token
from ._tuning import TokenTiming, Tuning, plan_token

__all__ = ["Entry", "MemoryTier", "ScopeArg"]

#: What callers pass: a scope (or None), or (scope, customer owner_id) for a customer.
ScopeArg = str | None | tuple[str | None, str]


@dataclass(eq=False)
class Entry:
    """A token in the memory tier, with its timing and the hot aliases that serve it.

    The wall-clock moments of ``timing`` are mirrored on the monotonic clock at install
    (``*_mono``): a token is usable only while both clocks agree, so a wall clock
    stepped back cannot make an expired token look fresh.
    """

    token: Token
    timing: TokenTiming
    usable_until_mono: float
    refresh_at_mono: float
    aliases: set[ScopeArg] = field(default_factory=set)
    # A weak reference: if the event loop is closed with the timer pending, dropping
    # the handle retires the entry (see MemoryTier._arm), since the timer never will.
    timer: weakref.ref[asyncio.TimerHandle] | None = None
    refresh_not_before: float = 0.0  # monotonic

    def usable(self, now: float, mono: float) -> bool:
        return now < self.timing.usable_until and mono < self.usable_until_mono

    def due(self, now: float, mono: float) -> bool:
        """Whether the refresh moment has come (by either clock)."""
        return now >= self.timing.refresh_at or mono >= self.refresh_at_mono

    def cancel_timer(self) -> None:
        handle = self.timer() if self.timer is not None else None
        if handle is not None:
            handle.cancel()
        self.timer = None


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

    def tokens_held(self) -> list[Token]:
        """The tokens of every entry (for metrics)."""
        return [entry.token for entry in self._entries.values()]

    def keys(self) -> set[str]:
        """The keys that have an entry."""
        return set(self._entries)

    def forget_pending(self, key: str) -> None:
        """The flight of ``key`` failed: its waiters are not served hot by a later one."""
        self._pending.pop(key, None)

    def forget_idle_pending(self, in_flight: Callable[[str], bool]) -> None:
        """Drop the waiters recorded for keys with no flight any more."""
        for key in [k for k in self._pending if not in_flight(k)]:
            del self._pending[key]

    def install(self, key: str, token: Token) -> Token:
        """Make ``token`` the entry for ``key``, served hot until its refresh moment."""
        now = self._clock.time()
        mono = self._clock.monotonic()
        old = self._entries.get(key)
        if old is not None and old.token.access_token == token.access_token:
            # The same token came back (Commerce Layer reissues only near expiry):
            # keep its timing, and wait the minimum gap before asking again.
            old.refresh_not_before = mono + old.timing.min_gap
            return old.token
        timing = plan_token(token, self._tuning, now, self._rng)
        entry = Entry(
            token,
            timing,
            usable_until_mono=mono + (timing.usable_until - now),
            refresh_at_mono=mono + (timing.refresh_at - now),
        )
        aliases = self._pending.pop(key, set())
        if old is not None:
            aliases |= old.aliases
            self.drop(key)
        self._entries[key] = entry
        if not entry.due(now, mono):
            self._arm(entry, asyncio.get_running_loop())
            for alias in aliases:
                self.promote(alias, entry)
        return token

    def _arm(self, entry: Entry, loop: asyncio.AbstractEventLoop) -> None:
        """Retire ``entry`` from the hot tier at its refresh moment, by a loop timer.

        The handle is held weakly: a loop closed with the timer still pending drops it,
        and dropping it retires the entry, which the timer never will. (A timer that
        fired or was cancelled is dropped too; retiring then changes nothing.)
        """
        delay = entry.refresh_at_mono - self._clock.monotonic()
        handle = loop.call_later(max(delay, 0.0), self.retire, entry)
        entry.timer = weakref.ref(handle, lambda _ref, e=entry: self.retire(e))  # type: ignore[misc]

    def promote(self, scope_arg: ScopeArg, entry: Entry) -> None:
        """Serve ``entry`` on the hot path to callers passing ``scope_arg``."""
        if not self._tuning.hot_tier:
            return
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
            entry.cancel_timer()
        return entry

    def sweep(self) -> None:
        """Retire every hot entry whose refresh moment has come by either clock, and
        forget tokens that have expired (a scope asked for once must not be kept)."""
        now = self._clock.time()
        mono = self._clock.monotonic()
        for key, entry in list(self._entries.items()):
            if now >= entry.token.expires_at:
                self.drop(key)
            elif entry.aliases and entry.due(now, mono):
                self.retire(entry)

    def clear_hot(self) -> None:
        """Empty the hot tier (the memory tier keeps its tokens)."""
        self.headers.clear()
        self.tokens.clear()
        for entry in self._entries.values():
            entry.aliases.clear()

    def cancel_timers(self) -> None:
        for entry in self._entries.values():
            entry.cancel_timer()

    def rearm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Re-create every retirement timer on ``loop`` (the old loop's died with it)."""
        self.cancel_timers()
        now = self._clock.time()
        mono = self._clock.monotonic()
        for entry in self._entries.values():
            if not entry.due(now, mono):
                self._arm(entry, loop)
