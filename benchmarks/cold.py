"""Cold ``header()`` per backend ÷ a raw aiohttp POST to the same token server.

A cold call is the whole miss path: the hot tier misses, the shared backend is read,
its lock taken, the token fetched, written and the lock released. Its floor is what
any client pays for a token at least: one POST, its answer parsed. What lies between
the two is the library's own cost (and the backend's round trips).

For Redis, a third side in the same rounds is the physical floor the issue names: the
raw POST between two bare ``EVALSHA`` round trips on a redis-py client of its own (the
manager's two: read-or-lock before the POST, write-and-release after). On a VM whose
processes sleep between calls, each round trip there costs a wake-up of the Redis
server and of this process, several times a back-to-back round trip.

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
        trips = await _round_trips(cfg.redis_url) if "redis" in backends else None
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
            if trips is not None:
                await trips()
            floor_s: dict[str, list[float]] = {name: [] for name in managers}
            cold_s: dict[str, list[float]] = {name: [] for name in managers}
            ratios: dict[str, list[float]] = {name: [] for name in managers}
            physical_s: list[float] = []
            physical_ratios: list[float] = []
            before = await server.requests()
            for i in range(rounds):
                for name, manager in managers.items():
                    scope = f"market:code:bench-cold-{tag}-{name}-{i}"
                    sides = ["floor", "cold"] + (["physical"] if name == "redis" else [])
                    # Each side goes first, second (and third) in turn.
                    sides = sides[i % len(sides) :] + sides[: i % len(sides)]
                    took: dict[str, float] = {}
                    gc.collect()
                    for side in sides:
                        start = time.perf_counter()
                        if side == "floor":
                            await post()
                        elif side == "cold":
                            await manager.header(scope)
                        else:
                            assert trips is not None
                            await trips(post)
                        took[side] = time.perf_counter() - start
                    floor_s[name].append(took["floor"])
                    cold_s[name].append(took["cold"])
                    ratios[name].append(took["cold"] / took["floor"])
                    if "physical" in took:
                        physical_s.append(took["physical"])
                        physical_ratios.append(took["cold"] / took["physical"])
            requests = await server.requests() - before
        finally:
            for manager in managers.values():
                await manager.aclose()
            if trips is not None:
                await trips.aclose()
            shutil.rmtree(directory, ignore_errors=True)
    extra: dict[str, dict[str, Any]] = {}
    if physical_s:
        extra["redis"] = {
            "physical_floor_s_median": median(physical_s),
            "ratio_to_physical_floor_median": median(physical_ratios),
            "physical_floor": "raw POST between two bare EVALSHA round trips",
        }
    return {
        "rounds": rounds,
        "server": "FakeAuthServer in another process (benchmarks.remote), no added latency",
        "token_requests": requests,
        # The physical floor's POST is one more per Redis round.
        "token_requests_expected": 2 * rounds * len(managers) + (rounds if physical_s else 0),
        "backends": {
            name: {
                "floor_s_median": median(floor_s[name]),
                "cold_s_median": median(cold_s[name]),
                "ratio_median": median(ratios[name]),
                "added_s_median": median(
                    [c - f for c, f in zip(cold_s[name], floor_s[name], strict=True)]
                ),
                "ratios": ratios[name],
                **extra.get(name, {}),
            }
            for name in managers
        },
        "skipped": skipped,
    }


class _RoundTrips:
    """The Redis part of the physical floor: two bare ``EVALSHA`` round trips (a script
    that reads three keys and sets one, as read-or-lock does; and one that deletes it),
    on a client of its own, around the raw POST."""

    def __init__(self, client: Any, lock_sha: str, unlock_sha: str) -> None:
        self._client = client
        self._lock_sha = lock_sha
        self._unlock_sha = unlock_sha
        self._key = f"cl-tokens-bench-rt-{secrets.token_hex(6)}"

    async def __call__(self, post: Any = None) -> None:
        await self._client.evalsha(self._lock_sha, 3, self._key, self._key + ":b", self._key + ":c")
        if post is not None:
            await post()
        await self._client.evalsha(self._unlock_sha, 1, self._key)

    async def aclose(self) -> None:
        await self._client.delete(self._key)
        await self._client.aclose()


async def _round_trips(url: str) -> _RoundTrips:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    lock = await client.script_load(
        "local v = redis.call('GET', KEYS[1]) "
        "local b = redis.call('GET', KEYS[3]) "
        "if v then return {1, v} end "
        "redis.call('SET', KEYS[1], 'x', 'PX', 60000) return {2, b}"
    )
    unlock = await client.script_load("return redis.call('DEL', KEYS[1])")
    return _RoundTrips(client, lock, unlock)
