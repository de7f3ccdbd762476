"""A fake token server with N customers, in its own process, for ``--only customers``:
tracemalloc in the benchmark's process then counts the manager's memory alone.

Run as ``python -m benchmarks._customer_server N``. Prints ``URL CLIENT_ID SECRET``;
then answers each ``count`` line on stdin with the token requests so far, and exits at
the end of stdin.
"""

from __future__ import annotations

import asyncio
import sys

from cl_tokens.testing import FakeAuthServer


async def main(customers: int) -> None:
    server = FakeAuthServer()
    server.customers.expires_in = 4 * 3600
    for i in range(customers):
        server.customers.add(f"c{i}@example.com", "pw")
    async with server:
        print(server.url, server.client_id, server.client_secret, flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            print(server.token_requests, flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
