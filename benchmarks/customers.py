"""Customers held in one process (``--only customers``): memory per customer and the
warm ``header(customer=...)`` next to the floor.

10,000 customers log in (password grant, real HTTP to the fake server, which runs in its
own process); tracemalloc counts what the manager keeps for them, the token and its
refresh token included; then the warm path cycles over them, timed in alternating slices
with a floor that looks up the same number of header strings in a dict.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
from typing import Any

from cl_tokens import TokenManager

from ._common import Config, Paired, paired_round

__all__ = ["customers"]


def _cycle_loop(fn: Any, owners: list[str]) -> Any:
    count = len(owners)

    async def loop(n: int) -> None:
        for i in range(n):
            await fn(owners[i % count])

    return loop


def _cycle_customer_loop(header: Any, owners: list[str]) -> Any:
    """The same loop shape as the floor's, calling ``header(customer=...)`` itself: a
    wrapper coroutine around it would time two frames against the floor's one."""
    count = len(owners)

    async def loop(n: int) -> None:
        for i in range(n):
            await header(customer=owners[i % count])

    return loop


async def customers(cfg: Config) -> dict[str, Any]:
    n = 1_000 if cfg.quick else 10_000
    # The server runs in its own process: tracemalloc here sees the manager alone.
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks._customer_server",
        str(n),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        url, client_id, secret = (await server.stdout.readline()).decode().split()
        manager = TokenManager(client_id, secret, auth_url=url)
        try:
            await manager.header()  # binds the loop, the session and the keeper
            tokens = []
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for start in range(0, n, 100):
                    batch = range(start, min(n, start + 100))
                    tokens += await asyncio.gather(
                        *(manager.login(f"c{i}@example.com", "pw") for i in batch)
                    )
                owners = [token.owner_id or "" for token in tokens]
                for owner in owners:
                    await manager.header(customer=owner)
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            # The tokens returned to the caller are the very objects the manager holds,
            # so nothing is counted twice (the two lists cost 16 B per customer).
            per_customer = (after - before) / n
            table = {o: (await manager.header(customer=o))["Authorization"] for o in owners}

            async def floor(owner: str) -> dict[str, str]:
                return {"Authorization": table[owner]}

            floor_loop = _cycle_loop(floor, owners)
            subject_loop = _cycle_customer_loop(manager.header, owners)
            await floor_loop(20_000)
            await subject_loop(20_000)
            paired = Paired(f"{n} customers", cfg.calls, cfg.calls)
            for round_no in range(cfg.rounds):
                first = "floor" if round_no % 2 == 0 else "subject"
                paired.add(
                    await paired_round(floor_loop, subject_loop, cfg.calls, cfg.calls, first=first)
                )
            server.stdin.write(b"count\n")
            await server.stdin.drain()
            requests = int((await server.stdout.readline()).decode())
        finally:
            await manager.aclose()
    finally:
        server.stdin.close()
        await server.wait()
    return {
        "customers": n,
        "bytes_per_customer": per_customer,
        "access_token_chars": len(tokens[0].access_token),
        "refresh_token_chars": len(tokens[0].refresh_token or ""),
        "warm": paired.as_dict(),
        "token_requests": requests,
    }
