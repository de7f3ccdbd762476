"""A worker for the customer fleet test: 100 coroutines ask for one customer's token.

Run as ``python tests/customer_worker.py AUTH_URL BACKEND OWNER_ID KEY START_AT``;
prints one JSON line with the distinct headers served.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from cl_tokens import TokenManager


async def main() -> None:
    auth_url, backend, owner, key, start_at = sys.argv[1:6]
    async with TokenManager(
        "test-client-id",
        "test-client-secret",
        auth_url=auth_url,
        backend=backend,
        encryption_key=key,
    ) as manager:
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        headers = await asyncio.gather(*(manager.header(customer=owner) for _ in range(100)))
    print(
        json.dumps(
            {"headers": sorted({h["Authorization"] for h in headers}), "served": len(headers)}
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
