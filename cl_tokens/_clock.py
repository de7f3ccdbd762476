"""Clocks: wall time for expiry, monotonic time for intervals; injectable for tests."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """What the manager reads the time from. Inject one to test expiry without sleeping."""

    def time(self) -> float:
        """Wall-clock unix time in seconds (token expiry is absolute wall time)."""
        ...

    def monotonic(self) -> float:
        """A clock that never goes back, in seconds (cool-downs and gaps)."""
        ...


class SystemClock:
    """The real clocks: ``time.time`` and ``time.monotonic``."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
