"""A worker process for the fleet back-off tests: callers that keep asking for a token.

Run as ``python tests/fleet_worker.py AUTH_URL BACKEND CALLERS START_AT DURATION``;
prints one JSON line: how many calls were served or failed, and the ``retry_after``
values the failures carried.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from cl_tokens import TokenEndpointError, TokenManager


async def main() -> None:
    auth_url, backend, callers, start_at, duration = sys.argv[1:6]
    served = failed = 0
    retry_afters: list[float] = []
    other: list[str] = []
    async with TokenManager(
        "test-client-id", "test-client-secret", auth_url=auth_url, backend=backend
    ) as manager:
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        end = time.monotonic() + float(duration)

        async def caller() -> None:
            nonlocal served, failed
            while time.monotonic() < end:
                try:
                    await manager.header()
                    served += 1
                except TokenEndpointError as error:
                    failed += 1
                    if error.retry_after is not None:
                        retry_afters.append(error.retry_after)
                except Exception as error:  # anything else is a bug the test reports
                    other.append(f"{type(error).__name__}: {error}")
                await asyncio.sleep(0.05)

        await asyncio.gather(*(caller() for _ in range(int(callers))))
    print(
        json.dumps(
            {
                "served": served,
                "failed": failed,
                "retry_after_min": min(retry_afters, default=None),
                "retry_after_max": max(retry_afters, default=None),
                "other": other[:5],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
