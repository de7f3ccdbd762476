"""SingleFlight on its own: one task per key, shared by every caller."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from cl_tokens._singleflight import SingleFlight


async def test_concurrent_callers_share_one_call_per_key() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = {"a": 0, "b": 0}

    def work(key: str):  # type: ignore[no-untyped-def]
        async def run() -> int:
            calls[key] += 1
            await asyncio.sleep(0.01)
            return calls[key]

        return run

    results = await asyncio.gather(
        *(flight.run("a", work("a")) for _ in range(100)),
        *(flight.run("b", work("b")) for _ in range(100)),
    )
    assert calls == {"a": 1, "b": 1}
    assert results == [1] * 200
    assert not flight.in_flight("a")
    # A new call after the flight landed runs again.
    assert await flight.run("a", work("a")) == 2


async def test_an_error_reaches_every_caller_and_is_not_kept() -> None:
    flight: SingleFlight[str, int] = SingleFlight()

    async def fail() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    results = await asyncio.gather(
        *(flight.run("k", fail) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, ValueError) for r in results)

    async def ok() -> int:
        return 7

    assert await flight.run("k", ok) == 7


async def test_cancelling_callers_does_not_cancel_the_work() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    finished = asyncio.Event()

    async def work() -> int:
        await asyncio.sleep(0.05)
        finished.set()
        return 1

    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0.01)
    for caller in callers:
        caller.cancel()
    await asyncio.wait_for(finished.wait(), 1)
    for caller in callers:
        with pytest.raises(asyncio.CancelledError):
            await caller


async def test_an_abandoned_failure_is_not_reported_as_never_retrieved() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    reported: list[object] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    async def fail() -> int:
        raise RuntimeError("nobody listens")

    task = flight.start("k", fail)
    await asyncio.sleep(0.01)
    del task
    import gc

    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert reported == []


async def test_a_forgotten_flight_never_settles_the_waiters_of_its_successor() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    release_old = asyncio.Event()

    async def old() -> str:
        await release_old.wait()
        return "old"

    async def new() -> str:
        await asyncio.sleep(0.05)
        return "new"

    old_waiter = flight.join("k", old)
    flight.forget()  # as when the manager moves to a new event loop
    new_waiter = flight.join("k", new)
    release_old.set()
    assert await old_waiter == "old"
    assert not new_waiter.done()
    assert await new_waiter == "new"


def gated(value: int) -> tuple[asyncio.Event, Callable[[], Awaitable[int]]]:
    """Work that returns ``value`` once the returned gate is set."""
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return value

    return gate, work


async def test_an_alias_joins_the_flight_it_names_until_that_flight_ends() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    gate = asyncio.Event()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return calls

    assert flight.join_alias(("scope", None)) is None  # nothing in flight yet
    first = flight.join_as("key", work, ("scope", None))
    second = flight.join_as("key", work, "other alias")  # a second alias, same flight
    by_alias = [flight.join_alias(("scope", None)) for _ in range(50)]
    by_other = flight.join_alias("other alias")
    assert all(w is not None for w in by_alias)
    assert by_other is not None
    assert flight.start("key", work) is flight.tasks()[0]  # still one flight
    gate.set()
    results = await asyncio.gather(first, second, by_other, *by_alias)  # type: ignore[arg-type]
    assert calls == 1
    assert results == [1] * 53
    await asyncio.sleep(0)  # the flight's done callback
    # Forgotten with the flight: a later caller must look again, not wait on nothing.
    assert flight.join_alias(("scope", None)) is None
    assert flight.join_alias("other alias") is None
    assert flight._aliases == {}


async def test_a_waiter_that_joined_by_alias_can_leave_without_stopping_the_others() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    gate, work = gated(5)

    owner = flight.join_as("key", work, "alias")
    leaving = flight.join_alias("alias")
    staying = flight.join_alias("alias")
    assert leaving is not None
    assert staying is not None
    leaving.cancel()
    gate.set()
    assert await owner == 5
    assert await staying == 5
    assert leaving.cancelled()


async def test_forget_drops_aliases_with_the_flights() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    gate, work = gated(1)

    waiter = flight.join_as("key", work, "alias")
    flight.forget()
    assert flight.join_alias("alias") is None
    gate.set()
    assert await waiter == 1  # the old flight still settles its own waiters


async def test_unalias_forgets_only_that_flights_aliases() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    gate, work = gated(1)

    a = flight.join_as("a", work, "alias of a")
    b = flight.join_as("b", work, "alias of b")
    flight.unalias("a")
    flight.unalias("nothing in flight")  # no-op
    assert flight.join_alias("alias of a") is None
    assert flight.in_flight("a")  # the flight itself runs on for its waiters
    joined = flight.join_alias("alias of b")
    assert joined is not None
    gate.set()
    assert await a == 1
    assert await b == 1
    assert await joined == 1
