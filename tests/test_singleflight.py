"""SingleFlight on its own: one task per key, shared by every caller."""

from __future__ import annotations

import asyncio

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
