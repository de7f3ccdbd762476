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
import heapq
import math
import random
import weakref
from collections.abc import Callable
from typing import Any

from ._clock import Clock
from ._token import Token
from ._tuning import TokenTiming, Tuning, plan_token

__all__ = ["Entry", "MemoryTier", "ScopeArg"]

#: What callers pass: a scope (or None), or (scope, customer owner_id) for a customer.
ScopeArg = str | None | tuple[str | None, str]


_NO_ALIAS: Any = object()  # an alias may be None (the default scope)


class Entry:
    """A token in the memory tier, with its timing and the hot aliases that serve it.

    The wall-clock moments (``usable_until``, ``refresh_at``) are mirrored on the
    monotonic clock by one offset taken at install: a token is usable only while both
    clocks agree, so a wall clock stepped back cannot make an expired token look fresh.
    Slotted, its timing held inline and its first alias in a slot: one of these per
    cached scope or customer.
    """

    __slots__ = (
        "alias",
        "due_loop",
        "min_gap",
        "more_aliases",
        "offset",
        "refresh_at",
        "refresh_not_before",
        "token",
        "usable_until",
    )

    def __init__(self, token: Token, timing: TokenTiming, offset: float) -> None:
        self.token = token
        self.usable_until = timing.usable_until
        self.refresh_at = timing.refresh_at
        self.min_gap = timing.min_gap
        self.offset = offset  # monotonic minus wall clock, at install
        self.refresh_not_before = 0.0  # monotonic
        self.alias: ScopeArg = _NO_ALIAS
        self.more_aliases: tuple[ScopeArg, ...] = ()
        self.due_loop = 0.0  # loop time of its retirement while in the tier's heap

    @property
    def timing(self) -> Entry:
        """The entry's timing (``usable_until``, ``refresh_at``, ``min_gap``): the entry
        holds it itself rather than in a second object."""
        return self

    @property
    def usable_until_mono(self) -> float:
        return self.usable_until + self.offset

    @property
    def refresh_at_mono(self) -> float:
        return self.refresh_at + self.offset

    @property
    def aliases(self) -> tuple[ScopeArg, ...]:
        if self.alias is _NO_ALIAS:
            return ()
        return (self.alias, *self.more_aliases)

    def add_alias(self, scope_arg: ScopeArg) -> None:
        if self.alias is _NO_ALIAS:
            self.alias = scope_arg
        elif scope_arg != self.alias and scope_arg not in self.more_aliases:
            self.more_aliases = (*self.more_aliases, scope_arg)

    def clear_aliases(self) -> None:
        self.alias = _NO_ALIAS
        self.more_aliases = ()

    def __lt__(self, other: Entry) -> bool:  # heap order: the next to retire first
        return self.due_loop < other.due_loop

    def usable(self, now: float, mono: float) -> bool:
        return now < self.usable_until and mono < self.usable_until + self.offset

    def due(self, now: float, mono: float) -> bool:
        """Whether the refresh moment has come (by either clock)."""
        return now >= self.refresh_at or mono >= self.refresh_at + self.offset


class MemoryTier:
    """Entries by cache key, and the hot dicts (``headers``, ``tokens``) read directly
    by the manager's hot path.

    One loop timer serves the whole tier: entries wait in a heap ordered by their
    retirement moment, and the timer is set for the earliest (a timer per entry would
    cost more than the rest of the entry).

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
        # Customers' headers for the default scope, by owner id (not in ``headers``
        # under (None, owner id): a tuple the warm path would have to build and hash).
        self.customer_headers: dict[str, str] = {}
        self._entries: dict[str, Entry] = {}
        self._pending: dict[str, set[ScopeArg]] = {}
        self._heap: list[Entry] = []
        self._dropped = 0  # entries still in the heap that have left the tier
        # Held weakly: a loop closed with the timer pending drops it, and dropping it
        # retires the hot tier, which the timer never will. (Replaced or fired, the
        # reference is let go first, so its callback does not run.)
        self._timer: weakref.ref[asyncio.TimerHandle] | None = None
        self._timer_when = math.inf
        self._offset = math.nan  # the last entry's offset (monotonic minus wall clock)

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
        if old is not None and old.token.authorization == token.authorization:
            # The same token came back (Commerce Layer reissues only near expiry):
            # keep its timing, and wait the minimum gap before asking again.
            old.refresh_not_before = mono + old.min_gap
            return old.token
        offset = mono - now
        if abs(offset - self._offset) < 0.001:
            # The clocks have not moved apart: share the last entry's float (24 B each).
            offset = self._offset
        else:
            self._offset = offset
        entry = Entry(token, plan_token(token, self._tuning, now, self._rng), offset)
        aliases = self._pending.pop(key, set())
        if old is not None:
            aliases.update(old.aliases)
            self.drop(key)
        self._entries[key] = entry
        if not entry.due(now, mono):
            self._arm(entry, asyncio.get_running_loop())
            for alias in aliases:
                self.promote(alias, entry)
        return token

    def _arm(self, entry: Entry, loop: asyncio.AbstractEventLoop) -> None:
        """Retire ``entry`` from the hot tier at its refresh moment, by the tier's timer."""
        delay = entry.refresh_at + entry.offset - self._clock.monotonic()
        entry.due_loop = loop.time() + max(delay, 0.0)
        heapq.heappush(self._heap, entry)
        if entry.due_loop < self._timer_when:
            self._set_timer(loop, entry.due_loop)

    def _set_timer(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._cancel_timer()
        handle = loop.call_at(when, self._fire, loop, when)
        self._timer = weakref.ref(handle, self._timer_lost)
        self._timer_when = when

    def _cancel_timer(self) -> None:
        ref, self._timer = self._timer, None
        self._timer_when = math.inf
        handle = ref() if ref is not None else None
        if handle is not None:
            handle.cancel()

    def _timer_lost(self, ref: weakref.ref[asyncio.TimerHandle]) -> None:
        if ref is self._timer:  # dropped while pending: its loop is gone
            self._timer = None
            self._timer_when = math.inf
            self.clear_hot()

    def _fire(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Retire every entry due by ``when`` (the timer's moment), then set the timer
        for the next one."""
        self._timer = None
        self._timer_when = math.inf
        limit = max(when, loop.time())
        heap = self._heap
        while heap and heap[0].due_loop <= limit:
            entry = heapq.heappop(heap)
            entry.due_loop = 0.0
            self.retire(entry)
        if heap:
            self._set_timer(loop, heap[0].due_loop)

    def promote(self, scope_arg: ScopeArg, entry: Entry) -> None:
        """Serve ``entry`` on the hot path to callers passing ``scope_arg``."""
        if not self._tuning.hot_tier:
            return
        entry.add_alias(scope_arg)
        self.tokens[scope_arg] = entry.token
        if type(scope_arg) is tuple and scope_arg[0] is None:
            # Only here, not also in ``headers``: header(customer=...) for the default
            # scope reads this dict first, and a third slot would cost ~30 B a customer.
            self.customer_headers[scope_arg[1]] = entry.token.authorization
        else:
            self.headers[scope_arg] = entry.token.authorization

    def retire(self, entry: Entry) -> None:
        """Take ``entry`` off the hot tier: its next caller takes the slow path."""
        for alias in entry.aliases:
            if self.tokens.get(alias) is entry.token:
                del self.tokens[alias]
                if type(alias) is tuple and alias[0] is None:
                    self.customer_headers.pop(alias[1], None)
                else:
                    del self.headers[alias]
        entry.clear_aliases()

    def drop(self, key: str) -> Entry | None:
        """Remove the entry for ``key`` from both tiers; returns it."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.retire(entry)
            if entry.due_loop:
                # Left in the heap (removing it costs a scan); compacted once the
                # dropped ones are half of it, so the heap stays bounded by the tier.
                self._dropped += 1
                if self._dropped >= len(self._heap):  # nothing left to retire
                    self.cancel_timers()
                elif self._dropped > 16 and 2 * self._dropped > len(self._heap):
                    live = {id(e) for e in self._entries.values()}
                    self._heap = [e for e in self._heap if id(e) in live]
                    heapq.heapify(self._heap)
                    self._dropped = 0
        return entry

    def sweep(self) -> None:
        """Retire every hot entry whose refresh moment has come by either clock, and
        forget tokens that have expired (a scope asked for once must not be kept)."""
        now = self._clock.time()
        mono = self._clock.monotonic()
        for key, entry in list(self._entries.items()):
            if now >= entry.token.expires_at:
                self.drop(key)
            elif entry.alias is not _NO_ALIAS and entry.due(now, mono):
                self.retire(entry)

    def clear_hot(self) -> None:
        """Empty the hot tier (the memory tier keeps its tokens)."""
        self.headers.clear()
        self.tokens.clear()
        self.customer_headers.clear()
        for entry in self._entries.values():
            entry.clear_aliases()

    def cancel_timers(self) -> None:
        self._cancel_timer()
        for entry in self._heap:
            entry.due_loop = 0.0
        self._heap.clear()
        self._dropped = 0

    def rearm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Re-create the retirement timer on ``loop`` (the old loop's died with it)."""
        self.cancel_timers()
        now = self._clock.time()
        mono = self._clock.monotonic()
        for entry in self._entries.values():
            if not entry.due(now, mono):
                self._arm(entry, loop)
