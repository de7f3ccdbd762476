"""A worker for the failover-under-load tests: CALLERS coroutines spread over SCOPES
scopes call ``await manager.header(scope)`` over and over, from START_AT to STOP_AT
(wall clock), each pausing PAUSE_MS on average between calls.

Run as ``python tests/redis_failover_worker.py AUTH_URL BACKEND_URL CALLERS SCOPES
START_AT STOP_AT PAUSE_MS``. Prints one JSON line: the calls made, the worst call started in
each second of the run, how many calls took over a second, the errors by type, and
every distinct Authorization header seen. SAFETY_MARGIN is the manager's
``safety_margin``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections import Counter

from cl_tokens import BackendError, TokenManager


async def main() -> None:
    if os.environ.get("CL_TOKENS_FAILOVER_LOG_DIR"):  # see the test
        import logging

        logging.basicConfig(
            level=logging.DEBUG, format="%(created).3f %(process)d %(name)s %(message)s"
        )
        logging.getLogger("asyncio").setLevel(logging.WARNING)
    auth_url, backend, callers, scopes, pause_ms, margin = sys.argv[1:7]
    names = [f"market:code:m{i}" for i in range(int(scopes))]
    pause = float(pause_ms) / 1000
    calls = 0
    worst: list[float] = []  # the slowest call started in each second of the run
    slow = 0
    errors: Counter[str] = Counter()
    headers: set[str] = set()

    async with TokenManager(
        "test-client-id",
        "test-client-secret",
        auth_url=auth_url,
        backend=backend,
        safety_margin=float(margin),
    ) as manager:
        # The cluster client's first initialization (CLUSTER SLOTS and the COMMAND
        # table) takes seconds for 8 interpreters on a loaded 2-core machine: paid
        # before the run, so it is not mistaken for part of a failover.
        for attempt in range(20):
            try:
                await manager.backend.connect()  # type: ignore[attr-defined]
                break
            except BackendError:  # a node slow to answer on a loaded machine
                if attempt == 19:
                    raise
                await asyncio.sleep(1)
        print("ready", flush=True)
        start_at, stop = map(float, (await asyncio.to_thread(sys.stdin.readline)).split())

        async def caller(scope: str) -> None:
            nonlocal calls, slow
            # A warm header() never suspends: the pause lets the other callers run.
            await asyncio.sleep(random.uniform(0, pause))
            while time.time() < stop:
                began_at, began = time.time(), time.monotonic()
                try:
                    header = await manager.header(scope)
                except Exception as exc:  # counted: a failover must not fail a caller
                    errors[type(exc).__name__] += 1
                    header = None
                took = time.monotonic() - began
                calls += 1
                if header is not None:
                    headers.add(header["Authorization"])
                second = max(0, int(began_at - start_at))
                if second >= len(worst):
                    worst.extend([0.0] * (second + 1 - len(worst)))
                worst[second] = max(worst[second], took)
                if took > 1.0:
                    slow += 1
                await asyncio.sleep(random.uniform(0.5, 1.5) * pause)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(caller(names[i % len(names)]) for i in range(int(callers))))
    print(
        json.dumps(
            {
                "calls": calls,
                "worst": worst,
                "slow": slow,
                "errors": dict(errors),
                "headers": sorted(headers),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
