"""Customers held in one process (``--only customers``): memory per customer and the
warm ``header(customer=...)`` next to the floor.

10,000 customers log in (password grant, real HTTP to the fake server); tracemalloc
counts what the manager keeps for them, the token and its refresh token included; then
the warm path cycles over them, timed in alternating slices with a floor that looks up
the same number of header strings in a dict.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from fnmatch import fnmatch
from typing import Any

from cl_tokens import TokenManager
from cl_tokens.testing import FakeAuthServer

from ._common import Config, Paired, paired_round

__all__ = ["customers"]


def _manager_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes held by allocations none of whose frames is the fake server's (it runs in
    this process). What ``Snapshot.filter_traces`` with ``all_frames=True`` computes,
    matching each file name once: fnmatch per frame per trace took over 20 minutes on the
    snapshot of 10,000 logins."""
    server_side = (
        "*/cl_tokens/testing/*",
        "*/aiohttp/web_*",
        "*/aiohttp/_http_parser*",
        "*/aiohttp/http_parser*",
    )
    verdicts: dict[str, bool] = {}

    def server(filename: str) -> bool:
        verdict = verdicts.get(filename)
        if verdict is None:
            verdict = verdicts[filename] = any(fnmatch(filename, p) for p in server_side)
        return verdict

    return sum(
        trace.size
        for trace in snapshot.traces
        if not any(server(frame.filename) for frame in trace.traceback)
    )


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
    async with FakeAuthServer() as server:
        server.customers.expires_in = 4 * 3600
        owners = [server.customers.add(f"c{i}@example.com", "pw") for i in range(n)]
        manager = TokenManager(server.client_id, server.client_secret, auth_url=server.url)
        try:
            await manager.header()  # binds the loop, the session and the keeper
            tokens = []
            gc.collect()
            # The fake server runs in this process: what its handlers keep (issued
            # tokens, recorded requests) is filtered out by the frames that allocated it.
            tracemalloc.start(32)
            try:
                before = _manager_bytes(tracemalloc.take_snapshot())
                for start in range(0, n, 100):
                    batch = range(start, min(n, start + 100))
                    tokens += await asyncio.gather(
                        *(manager.login(f"c{i}@example.com", "pw") for i in batch)
                    )
                for owner in owners:
                    await manager.header(customer=owner)
                gc.collect()
                after = _manager_bytes(tracemalloc.take_snapshot())
            finally:
                tracemalloc.stop()
            # The tokens returned to the caller are the very objects the manager holds,
            # so nothing is counted twice.
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
            requests = server.token_requests
        finally:
            await manager.aclose()
    return {
        "customers": n,
        "bytes_per_customer": per_customer,
        "access_token_chars": len(tokens[0].access_token),
        "refresh_token_chars": len(tokens[0].refresh_token or ""),
        "warm": paired.as_dict(),
        "token_requests": requests,
    }
