"""A worker process for the cross-process tests: many concurrent header() calls.

Run as ``python tests/cross_process_worker.py AUTH_URL BACKEND CALLERS START_AT
[LOCK_LEASE]``; prints one JSON line: the distinct headers it got and when.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from cl_tokens import TokenManager


async def main() -> None:
    auth_url, backend, callers, start_at = sys.argv[1:5]
    lease = float(sys.argv[5]) if len(sys.argv) > 5 else 60.0
    async with TokenManager(
        "test-client-id",
        "test-client-secret",
        auth_url=auth_url,
        backend=backend,
        lock_lease=lease,
        # A lock must outlive what its holder does under it: read, fetch, write.
        backend_timeout=0.5,
        fetch_deadline=min(30.0, lease - 1.0),
        attempts=1,
    ) as manager:
        # Everyone starts at the same instant, so the processes really do hit cold at once.
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        began = time.time()
        headers = await asyncio.gather(*(manager.header() for _ in range(int(callers))))
        done = time.time()
    print(
        json.dumps(
            {
                "headers": sorted({h["Authorization"] for h in headers}),
                "served": len(headers),
                "began": began,
                "done": done,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
