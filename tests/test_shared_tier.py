"""The bound on backend calls: a timeout that never swallows a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from cl_tokens._shared import within


async def test_a_call_within_its_bound_returns_its_result() -> None:
    async def answer() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert await within(answer(), 1.0) == 42


async def test_a_call_past_its_bound_times_out_and_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(asyncio.TimeoutError):
        await within(hang(), 0.05)
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_a_cancellation_arriving_with_the_result_is_not_dropped() -> None:
    # asyncio.wait_for before 3.12 returns the result here and loses the cancel
    # (CPython gh-86296): a cancelled aclose() would then let a fetch run on.
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[int] = loop.create_future()

    async def call() -> int:
        return await reply

    caller = asyncio.ensure_future(within(call(), 10))
    await asyncio.sleep(0.01)  # the caller is waiting on the call
    reply.set_result(1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
