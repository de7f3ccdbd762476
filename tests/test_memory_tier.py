"""The in-process tiers on their own: install, hot aliases, timers, the clock sweep."""

from __future__ import annotations

import asyncio
import random
import time

from fakeclock import FakeClock

from cl_tokens import SystemClock, Token, Tuning
from cl_tokens._memory_tier import MemoryTier


def _token(access: str, now: float, lifetime: float) -> Token:
    return Token(access, "Bearer", None, expires_at=now + lifetime, lifetime=lifetime)


async def test_a_flight_waiter_is_served_hot_once_the_token_lands() -> None:
    clock = FakeClock()
    tier = MemoryTier(Tuning(), clock, random.Random(1))
    tier.await_flight("k", None)
    tier.await_flight("k", "market:code:europe")
    tier.install("k", _token("aaaa.bbbb", clock.time(), 7200))
    assert tier.headers == {None: "Bearer aaaa.bbbb", "market:code:europe": "Bearer aaaa.bbbb"}
    assert tier.tokens[None].access_token == "aaaa.bbbb"


async def test_the_timer_retires_a_hot_entry_at_its_refresh_moment() -> None:
    tier = MemoryTier(Tuning(), SystemClock(), random.Random(1))
    now = time.time()
    # lifetime 0.4 s: window 0.2 s, jitter ≤ 0.04 s, so the refresh moment is ~0.16–0.2 s away
    entry_token = _token("short.lived", now, 0.4)
    tier.await_flight("k", None)
    tier.install("k", entry_token)
    assert None in tier.headers
    await asyncio.sleep(0.25)
    assert tier.headers == {}
    assert tier.get("k") is not None  # still in the memory tier, for the slow path


async def test_the_sweep_retires_what_the_wall_clock_says_is_due() -> None:
    clock = FakeClock()
    tier = MemoryTier(Tuning(), clock, random.Random(1))
    tier.await_flight("k", None)
    tier.install("k", _token("a.b.c", clock.time(), 7200))
    tier.sweep()
    assert None in tier.headers
    clock.advance(7200 - 600 + 1)  # past the refresh window's start, timers unaware
    tier.sweep()
    assert tier.headers == {}


async def test_the_same_token_again_keeps_its_timing_and_sets_the_gap() -> None:
    clock = FakeClock()
    tier = MemoryTier(Tuning(), clock, random.Random(1))
    first = tier.install("k", _token("same.token", clock.time(), 7200))
    entry = tier.get("k")
    assert entry is not None
    timing = entry.timing
    again = tier.install("k", _token("same.token", clock.time() + 5, 1000))
    assert again is first
    assert entry.timing is timing
    assert entry.refresh_not_before == clock.monotonic() + timing.min_gap


async def test_drop_cancels_the_timer_and_leaves_nothing_hot() -> None:
    clock = FakeClock()
    tier = MemoryTier(Tuning(), clock, random.Random(1))
    tier.await_flight("k", None)
    tier.install("k", _token("x.y.z", clock.time(), 7200))
    entry = tier.get("k")
    assert entry is not None
    assert tier._timer is not None
    handle = tier._timer()
    assert handle is not None
    assert tier.drop("k") is entry
    # The last entry gone, the tier's one timer goes too: nothing is left scheduled.
    assert handle.cancelled()
    assert tier._timer is None
    assert tier._heap == []
    assert tier.headers == {}
    assert tier.tokens == {}
    assert tier.get("k") is None


async def test_one_timer_serves_every_entry_in_order() -> None:
    """A timer per entry cost more than the rest of it: the tier keeps one, set for
    the earliest refresh moment, and each entry still leaves the hot tier at its own."""
    clock = FakeClock()
    tier = MemoryTier(Tuning(), clock, random.Random(1))
    loop = asyncio.get_running_loop()

    def pending() -> int:
        return sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]

    pending_before = pending()
    for i, lifetime in enumerate((7200, 2.0, 7200, 1.2)):
        tier.await_flight(f"k{i}", f"s{i}")
        tier.install(f"k{i}", _token(f"t.{i}.z", clock.time(), lifetime))
    assert pending() - pending_before == 1
    assert set(tier.headers) == {"s0", "s1", "s2", "s3"}
    # 1.2 s and 2 s tokens: refresh windows of half their lifetime, jitter up to 10%.
    await asyncio.sleep(0.75)
    assert set(tier.headers) == {"s0", "s1", "s2"}
    await asyncio.sleep(0.6)
    assert set(tier.headers) == {"s0", "s2"}
    assert pending() - pending_before == 1


async def test_dropped_entries_do_not_pile_up_in_the_heap() -> None:
    clock = FakeClock()
    tier = MemoryTier(Tuning(), clock, random.Random(1))
    tier.install("keep", _token("keep.token", clock.time(), 7200))
    for i in range(1000):
        tier.install("churn", _token(f"churn.{i}.z", clock.time(), 7200))
    assert len(tier._heap) <= 2 * 2 + 17


async def test_the_sweep_forgets_expired_tokens() -> None:
    clock = FakeClock()
    tier = MemoryTier(Tuning(), clock, random.Random(1))
    tier.install("old", _token("old.token", clock.time(), 60))
    tier.install("new", _token("new.token", clock.time(), 7200))
    clock.advance(61)
    tier.sweep()
    assert tier.get("old") is None
    assert tier.get("new") is not None
