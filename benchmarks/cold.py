"""Cold ``header()`` per backend ÷ a raw aiohttp POST to the same token server.

A cold call is the whole miss path: the hot tier misses, the shared backend is read,
its lock taken, the token fetched, written and the lock released. Its floor is what
any client pays for a token at least: one POST, its answer parsed. What lies between
the two is the library's own cost (and the backend's round trips).

The server runs in another process (``benchmarks.remote``, no added latency), so the
POST is a real round trip over loopback and the server's work is not timed on this
loop. The manager and the raw POST share one aiohttp session, connected before timing.
Each round takes a scope never used before, so the key is cold in every tier; within a
round, a raw POST and a cold ``header()`` run back to back, who goes first alternating,
and the figure is the median over rounds of their ratio.
"""

from __future__ import annotations

import gc
import secrets
import shutil
import tempfile
import time
from typing import Any

import aiohttp

from cl_tokens import TokenManager

from ._common import Config, median, redis_available
from .remote import RemoteServer
from .stampede import raw_post

__all__ = ["cold_path"]


async def cold_path(cfg: Config) -> dict[str, Any]:
    rounds = 20 if cfg.quick else 150
    directory = tempfile.mkdtemp(prefix="cl-tokens-bench-cold-")
    backends: dict[str, str | None] = {"memory": None, "file": f"file://{directory}"}
    skipped: dict[str, str] = {}
    why = await redis_available(cfg.redis_url)
    if why is None:
        backends["redis"] = cfg.redis_url
    else:
        skipped["redis"] = why
    tag = secrets.token_hex(4)
    # Tokens live 15 minutes: the Redis keys this run leaves behind expire on their own.
    server_cm = RemoteServer(expires_in=900.0)
    async with server_cm as server, aiohttp.ClientSession() as session:
        post = raw_post(session, server)
        managers = {
            name: TokenManager(
                server.client_id,
                server.client_secret,
                auth_url=server.url,
                backend=backend,
                session=session,
            )
            for name, backend in backends.items()
        }
        try:
            for name, manager in managers.items():  # warm up: imports, threads, connections
                await manager.header(f"market:code:bench-cold-{tag}-warm-{name}")
                await post()
            floor_s: dict[str, list[float]] = {name: [] for name in managers}
            cold_s: dict[str, list[float]] = {name: [] for name in managers}
            ratios: dict[str, list[float]] = {name: [] for name in managers}
            before = await server.requests()
            for i in range(rounds):
                for name, manager in managers.items():
                    scope = f"market:code:bench-cold-{tag}-{name}-{i}"
                    f = c = 0.0
                    gc.collect()
                    for side in ("floor", "cold") if i % 2 == 0 else ("cold", "floor"):
                        start = time.perf_counter()
                        if side == "floor":
                            await post()
                            f = time.perf_counter() - start
                        else:
                            await manager.header(scope)
                            c = time.perf_counter() - start
                    floor_s[name].append(f)
                    cold_s[name].append(c)
                    ratios[name].append(c / f)
            requests = await server.requests() - before
        finally:
            for manager in managers.values():
                await manager.aclose()
            shutil.rmtree(directory, ignore_errors=True)
    return {
        "rounds": rounds,
        "server": "FakeAuthServer in another process (benchmarks.remote), no added latency",
        "token_requests": requests,
        "token_requests_expected": 2 * rounds * len(managers),
        "backends": {
            name: {
                "floor_s_median": median(floor_s[name]),
                "cold_s_median": median(cold_s[name]),
                "ratio_median": median(ratios[name]),
                "added_s_median": median(
                    [c - f for c, f in zip(cold_s[name], floor_s[name], strict=True)]
                ),
                "ratios": ratios[name],
            }
            for name in managers
        },
        "skipped": skipped,
    }
