"""Single flight: concurrent callers with the same key share one in-flight call.

No I/O here and no class-level state: each manager owns its own ``SingleFlight``.
The shared work runs in its own task, so cancelling a caller (the first one included)
never cancels it for the others; if every caller goes away the work still finishes,
because a token request already spent counts against the endpoint's rate limit and its
result is worth keeping.

Each caller waits on a future of its own, settled when the work ends: cancelling a
caller cancels only that future. This is ``asyncio.shield`` without its second future
and second callback per caller, which matters when ten thousand callers wait at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """One task per key; every caller of ``run`` for that key gets the task's outcome."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}
        self._waiters: dict[K, list[asyncio.Future[V]]] = {}

    def start(self, key: K, work: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """The task in flight for ``key``, or a new one running ``work()``."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(_await(work))
            self._tasks[key] = task
            self._waiters[key] = []
            task.add_done_callback(lambda t, k=key: self._finished(k, t))  # type: ignore[misc]
        return task

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """Join the flight for ``key`` (starting it if needed) and return its result."""
        task = self.start(key, work)
        waiter: asyncio.Future[V] = task.get_loop().create_future()
        self._waiters[key].append(waiter)
        return await waiter

    def in_flight(self, key: K) -> bool:
        return key in self._tasks

    def tasks(self) -> list[asyncio.Task[V]]:
        return list(self._tasks.values())

    def forget(self) -> None:
        """Drop every flight without touching it (their event loop is gone)."""
        self._tasks.clear()
        self._waiters.clear()

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        waiters = self._waiters.pop(key, [])
        if task.cancelled():
            for waiter in waiters:
                waiter.cancel()
            return
        # Retrieving the exception here also keeps a flight that every caller left from
        # printing "Task exception was never retrieved".
        error = task.exception()
        if error is None:
            result = task.result()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(result)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)


async def _await(work: Callable[[], Awaitable[V]]) -> V:
    return await work()
