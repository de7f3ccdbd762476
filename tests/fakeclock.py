"""A hand-driven clock for tests: ``time()`` and ``monotonic()`` move only on ``advance``.

Inject it as ``TokenManager(..., clock=FakeClock(), clock_check_interval=0.01)``: the
manager's hot tier is retired by loop timers (which run on real time and do not see this
clock) and by a wall-clock check every ``clock_check_interval`` seconds, so after an
``advance`` give the loop a moment (``await clock.settle()``) before the next call.
"""

from __future__ import annotations

import asyncio

__all__ = ["FakeClock"]


class FakeClock:
    """Wall and monotonic time that stand still until advanced."""

    def __init__(self, start: float = 1_700_000_000.0, monotonic_start: float = 10_000.0) -> None:
        self._time = start
        self._monotonic = monotonic_start

    def time(self) -> float:
        return self._time

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a FakeClock only moves forward")
        self._time += seconds
        self._monotonic += seconds

    def jump_wall(self, seconds: float) -> None:
        """Move only the wall clock (an NTP step or a suspend seen by time() alone)."""
        self._time += seconds

    async def settle(self, interval: float = 0.01) -> None:
        """Wait long enough for a manager's periodic clock check (``interval``) to run."""
        await asyncio.sleep(interval * 5)
