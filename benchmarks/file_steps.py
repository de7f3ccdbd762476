"""``python -m benchmarks.file_steps``: the file backend's cold path, called directly.

Not part of ``python -m benchmarks``: it drives only the backend, the way the cold path
calls it, so it measures a backend before the manager uses its cold-path methods (and
the same script measures an older checkout: ``PYTHONPATH=/path/to/old python -m
benchmarks.file_steps``).

- cold step: ``get_or_lock`` (a miss, so the lock is taken) then ``set_and_release``,
  on a key never used before; the median over rounds, and the thread hops each took.
- cross-process wake-up: N processes each call ``get_or_lock`` (the lock is held, so
  they wait) then ``wait_for``; this process writes with ``set_and_release``; each
  process reports how long after the write began it held the token (``CLOCK_MONOTONIC``
  is one clock for the whole machine). p50 and p99 over every process of every round.
- the same-run floor (with ``--redis-url``): a bare Redis pub/sub fan-out to as many
  processes (``benchmarks.fanout``), its rounds interleaved with the file rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import secrets
import statistics
import sys
import tempfile
import time
from typing import Any

from cl_tokens import Token
from cl_tokens.backends import FileBackend, LockHandle


def _token() -> Token:
    now = time.time()
    return Token(
        access_token="bench." + secrets.token_urlsafe(600),
        token_type="bearer",
        expires_at=now + 900,
        lifetime=900,
        scope="market:all",
    )


def _hops(backend: FileBackend) -> list[int]:
    counter = [0]
    real = backend._threads.run

    async def counted(*args: Any) -> Any:
        counter[0] += 1
        return await real(*args)

    backend._threads.run = counted  # type: ignore[method-assign,assignment]
    return counter


async def cold_steps(directory: str, rounds: int) -> dict[str, Any]:
    backend = FileBackend(directory)
    hops = _hops(backend)
    lock_s: list[float] = []
    write_s: list[float] = []
    lock_hops: list[int] = []
    write_hops: list[int] = []
    token = _token()
    for i in range(rounds + 5):
        key = f"cl_tokens:v2:bench{i}"
        before = hops[0]
        start = time.perf_counter()
        handle = await backend.get_or_lock(key, lease=60)
        mid = time.perf_counter()
        middle = hops[0]
        assert isinstance(handle, LockHandle)
        await backend.set_and_release(key, token, handle)
        end = time.perf_counter()
        if i >= 5:  # warm-up: threads started, directory made
            lock_s.append(mid - start)
            write_s.append(end - mid)
            lock_hops.append(middle - before)
            write_hops.append(hops[0] - middle)
    await backend.aclose()
    return {
        "get_or_lock_us": round(statistics.median(lock_s) * 1e6, 1),
        "set_and_release_us": round(statistics.median(write_s) * 1e6, 1),
        "cold_step_us": round(
            statistics.median(a + b for a, b in zip(lock_s, write_s, strict=True)) * 1e6, 1
        ),
        "get_or_lock_hops": max(lock_hops),
        "set_and_release_hops": max(write_hops),
    }


def _follower(directory: str, key: str, ready: Any, out: Any) -> None:
    async def run() -> None:
        backend = FileBackend(directory)
        outcome = await backend.get_or_lock(key, lease=60)
        assert outcome is None, outcome
        ready.set()
        token = await backend.wait_for(key, timeout=10)
        out.put((time.monotonic(), token is not None))
        await backend.aclose()

    asyncio.run(run())


def _percentiles(delays: list[float]) -> dict[str, float]:
    delays = sorted(delays)
    return {
        "p50_ms": round(statistics.median(delays) * 1e3, 2),
        "p99_ms": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1e3, 2),
        "max_ms": round(delays[-1] * 1e3, 2),
    }


async def wake_ups(
    directory: str, processes: int, rounds: int, redis_url: str | None
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    backend = FileBackend(directory)
    delays: list[float] = []
    floor: list[float] = []
    missed = 0
    for r in range(rounds):
        if redis_url:
            from .fanout import pubsub_fanout_round

            bare = await pubsub_fanout_round(redis_url, processes, 1, 1200)
            floor.append(bare["wait_p50_s"])
            floor.append(bare["wait_p99_s"])
        key = f"cl_tokens:v2:wake{r}-{secrets.token_hex(4)}"
        handle = await backend.get_or_lock(key, lease=60)
        assert isinstance(handle, LockHandle)
        out = ctx.Queue()
        readies = [ctx.Event() for _ in range(processes)]
        procs = [
            ctx.Process(target=_follower, args=(directory, key, ready, out)) for ready in readies
        ]
        for proc in procs:
            proc.start()
        for ready in readies:
            await asyncio.to_thread(ready.wait, 60)
        await asyncio.sleep(0.2)  # every follower is inside wait_for
        wrote = time.monotonic()
        await backend.set_and_release(key, _token(), handle)
        for _ in procs:
            woke, ok = await asyncio.to_thread(out.get, True, 30)
            delays.append(woke - wrote)
            missed += not ok
        for proc in procs:
            await asyncio.to_thread(proc.join)
    await backend.aclose()
    result: dict[str, Any] = {"processes": processes, "rounds": rounds, "without_token": missed}
    result["file"] = _percentiles(delays)
    if floor:
        # Each fan-out round gives its own p50 and p99; the floor is their medians.
        result["pubsub_floor"] = {
            "p50_ms": round(statistics.median(floor[0::2]) * 1e3, 2),
            "p99_ms": round(statistics.median(floor[1::2]) * 1e3, 2),
        }
        result["p99_ratio"] = round(result["file"]["p99_ms"] / result["pubsub_floor"]["p99_ms"], 2)
    return result


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.file_steps")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--wake-rounds", type=int, default=5)
    parser.add_argument("--redis-url", default=None, help="adds the bare pub/sub floor")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cl-tokens-bench-file-") as directory:
        result = {
            "cold": await cold_steps(directory, args.rounds),
            "wake": await wake_ups(directory, args.processes, args.wake_rounds, args.redis_url),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
