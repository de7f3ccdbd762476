"""Single flight: concurrent callers with the same key share one in-flight call.

No I/O here and no class-level state: each manager owns its own ``SingleFlight``.
The shared work runs in its own task, so cancelling a caller (the first one included)
never cancels it for the others; if every caller goes away the work still finishes,
because a token request already spent counts against the endpoint's rate limit and its
result is worth keeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """One task per key; every caller of ``run`` for that key awaits the same task."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def start(self, key: K, work: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """The task in flight for ``key``, or a new one running ``work()``."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(_await(work))
            self._tasks[key] = task
            task.add_done_callback(lambda t, k=key: self._finished(k, t))  # type: ignore[misc]
        return task

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """Join the flight for ``key`` (starting it if needed) and return its result."""
        return await asyncio.shield(self.start(key, work))

    def in_flight(self, key: K) -> bool:
        return key in self._tasks

    def tasks(self) -> list[asyncio.Task[V]]:
        return list(self._tasks.values())

    def forget(self) -> None:
        """Drop every flight without touching it (their event loop is gone)."""
        self._tasks.clear()

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        # Mark the exception retrieved: waiters got it already, and a flight that every
        # caller left must not print "Task exception was never retrieved".
        if not task.cancelled():
            task.exception()


async def _await(work: Callable[[], Awaitable[V]]) -> V:
    return await work()
