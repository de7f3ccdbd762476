"""A worker for the multi-scope cross-process tests: CALLERS coroutines spread over
SCOPES scopes ask one manager for headers at the same instant.

Run as ``python tests/redis_scopes_worker.py AUTH_URL BACKEND CALLERS SCOPES START_AT [RUN]``
(RUN names the scopes apart, so each run of a test starts cold on the same Redis).
BACKEND is a URL, or ``cluster-client:HOST:PORT`` for an injected, uninitialized
``RedisCluster``. Prints one JSON line: the distinct headers per scope.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from cl_tokens import TokenManager
from cl_tokens.backends import RedisBackend, TokenBackend


async def main() -> None:
    auth_url, target, callers, scopes, start_at = sys.argv[1:6]
    run = sys.argv[6] if len(sys.argv) > 6 else "0"
    backend: TokenBackend | str = target
    client = None
    if target.startswith("cluster-client:"):
        from redis.asyncio import RedisCluster

        _, host, port = target.split(":")
        client = RedisCluster(host=host, port=int(port))
        backend = RedisBackend(client)
    names = [f"market:code:r{run}m{i}" for i in range(int(scopes))]
    async with TokenManager(
        "test-client-id",
        "test-client-secret",
        auth_url=auth_url,
        backend=backend,
        # The default backend timings: the first call initializes the cluster client
        # (CLUSTER SLOTS and the COMMAND table, seconds for 8 interpreters on a loaded
        # 2-core machine), which the manager allows 5 x backend_timeout, once.
        attempts=1,
    ) as manager:
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        headers = await asyncio.gather(
            *(manager.header(names[i % len(names)]) for i in range(int(callers)))
        )
    if client is not None:
        await client.aclose()
    seen: dict[str, list[str]] = {}
    for i, header in enumerate(headers):
        seen.setdefault(names[i % len(names)], []).append(header["Authorization"])
    print(json.dumps({scope: sorted(set(h)) for scope, h in seen.items()}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
