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


class _Flight(Generic[V]):
    """One in-flight task and the futures of the callers waiting for it."""

    __slots__ = ("aliases", "task", "waiters")

    def __init__(self, task: asyncio.Task[V]) -> None:
        self.task = task
        self.waiters: list[asyncio.Future[V]] = []
        self.aliases: list[Hashable] = []


class SingleFlight(Generic[K, V]):
    """One task per key; every caller of ``join`` for that key gets the task's outcome."""

    def __init__(self, cancelled: Callable[[], BaseException] | None = None) -> None:
        """
        Args:
            cancelled: what waiters get when the flight itself is cancelled (by its
                owner closing); None: they are cancelled too.
        """
        self._flights: dict[K, _Flight[V]] = {}
        self._aliases: dict[Hashable, _Flight[V]] = {}
        self._cancelled = cancelled

    def _flight(self, key: K, work: Callable[[], Awaitable[V]]) -> _Flight[V]:
        flight = self._flights.get(key)
        if flight is None:
            # work() is called only here: callers that join an existing flight build
            # nothing but their own future.
            flight = _Flight(asyncio.get_running_loop().create_task(_await(work)))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda _, k=key, f=flight: self._finished(k, f))  # type: ignore[misc]
        return flight

    def start(self, key: K, work: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """The task in flight for ``key``, or a new one running ``work()``."""
        return self._flight(key, work).task

    def join(self, key: K, work: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        """A future of this caller's own for the outcome of the flight for ``key``.

        A plain function, not a coroutine: awaiting the future directly saves a frame
        per caller, which counts when thousands wait at once.
        """
        return _wait_on(self._flight(key, work))

    def join_as(
        self, key: K, work: Callable[[], Awaitable[V]], alias: Hashable
    ) -> asyncio.Future[V]:
        """``join``, and remember the flight under ``alias`` until it ends: later
        callers that know only the alias join it with ``join_alias``."""
        flight = self._flight(key, work)
        if alias not in self._aliases:
            self._aliases[alias] = flight
            flight.aliases.append(alias)
        return _wait_on(flight)

    def join_alias(self, alias: Hashable) -> asyncio.Future[V] | None:
        """A future of this caller's own for the flight remembered under ``alias``, or
        None when there is none: the cheapest way in for the waiters of a stampede."""
        flight = self._aliases.get(alias)
        return None if flight is None else _wait_on(flight)

    def unalias(self, key: K) -> None:
        """Forget the aliases of the flight for ``key``: what they wait for is there
        already (installed by another path), so a later caller must look, not wait."""
        flight = self._flights.get(key)
        if flight is None:
            return
        for alias in flight.aliases:
            if self._aliases.get(alias) is flight:
                del self._aliases[alias]
        flight.aliases.clear()

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """Join the flight for ``key`` (starting it if needed) and return its result."""
        return await self.join(key, work)

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    def tasks(self) -> list[asyncio.Task[V]]:
        return [flight.task for flight in self._flights.values()]

    def forget(self) -> None:
        """Drop every flight without touching it (their event loop is gone)."""
        self._flights.clear()
        self._aliases.clear()

    def _finished(self, key: K, flight: _Flight[V]) -> None:
        # Only this flight's own waiters: after forget(), a new flight for the same key
        # may already be running, and a late callback of the old one must not touch it.
        if self._flights.get(key) is flight:
            del self._flights[key]
        for alias in flight.aliases:
            if self._aliases.get(alias) is flight:
                del self._aliases[alias]
        task = flight.task
        if task.cancelled():
            for waiter in flight.waiters:
                if waiter.done():
                    continue
                if self._cancelled is None:
                    waiter.cancel()
                else:
                    waiter.set_exception(self._cancelled())
            return
        # Retrieving the exception here also keeps a flight that every caller left from
        # printing "Task exception was never retrieved".
        error = task.exception()
        if error is None:
            result = task.result()
            for waiter in flight.waiters:
                if not waiter.done():
                    waiter.set_result(result)
        else:
            for waiter in flight.waiters:
                if not waiter.done():
                    waiter.set_exception(error)


def _wait_on(flight: _Flight[V]) -> asyncio.Future[V]:
    """A new future of one caller's own, settled with ``flight``'s outcome."""
    waiter: asyncio.Future[V] = flight.task.get_loop().create_future()
    flight.waiters.append(waiter)
    return waiter


async def _await(work: Callable[[], Awaitable[V]]) -> V:
    return await work()
