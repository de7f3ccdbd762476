"""The warm path: ``await manager.header()`` per backend, its peers, and how it scales.

The floor is the least an async header getter can do: ``async def floor(): return
{"Authorization": d[key]}`` (one dict lookup, one new dict). Each subject is timed in
the same loop shape (``for _ in range(n): await fn()``) right next to the floor.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import json
import secrets
import shutil
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from cl_tokens import Token, TokenManager
from cl_tokens._http import Answer
from cl_tokens._keys import CredentialKeys, credential_keys
from cl_tokens.backends import LockHandle, TokenBackend
from cl_tokens.testing import FakeAuthServer

from ._common import (
    Config,
    Paired,
    loop_of,
    measure_paired,
    paired_round,
    redis_available,
    scoped_loop_of,
)

__all__ = ["HandWrittenCache", "hot_path", "peers", "scale"]


def make_floor(value: str) -> Any:
    """The floor: a dict lookup and a new dict, in an ``async def``."""
    # Keyed by None like the manager's hot tier is for a call without a scope.
    d: dict[str | None, str] = {None: value}
    key = None

    async def floor() -> dict[str, str]:
        return {"Authorization": d[key]}

    return floor


class _Counting:
    """Counts the calls a manager makes to its backend (there must be none when warm)."""

    def __init__(self, backend: TokenBackend) -> None:
        self.calls = 0
        for name in ("get", "set", "delete", "acquire_lock", "release_lock"):
            setattr(backend, name, self._wrap(getattr(backend, name)))

    def _wrap(self, method: Any) -> Any:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await method(*args, **kwargs)

        return counted


async def hot_path(cfg: Config, server: FakeAuthServer) -> dict[str, Any]:
    """ns per warm ``await manager.header()`` for the memory, file and redis backends."""
    directory = tempfile.mkdtemp(prefix="cl-tokens-bench-")
    backends: dict[str, str | None] = {"memory": None, "file": f"file://{directory}"}
    skipped: dict[str, str] = {}
    why = await redis_available(cfg.redis_url)
    if why is None:
        backends["redis"] = cfg.redis_url
    else:
        skipped["redis"] = why
    managers: dict[str, TokenManager] = {}
    tokens: dict[str, Token] = {}
    counters: dict[str, _Counting] = {}
    try:
        requests_before = server.token_requests
        for name, backend in backends.items():
            manager = TokenManager(
                server.client_id,
                server.client_secret,
                # A scope of its own per run: a Redis key nobody else uses.
                scope=f"market:code:bench-{secrets.token_hex(6)}",
                auth_url=server.url,
                backend=backend,
            )
            managers[name] = manager
            await manager.header()  # cold: fetches and writes the shared backend
            tokens[name] = await manager.token()  # warm from here on
            counters[name] = _Counting(manager.backend)
        warm_requests = server.token_requests - requests_before
        value = (await managers["memory"].header())["Authorization"]
        subjects = {name: loop_of(m.header) for name, m in managers.items()}
        results = await measure_paired(subjects, loop_of(make_floor(value)), cfg)
        return {
            "backends": {name: paired.as_dict() for name, paired in results.items()},
            "backend_calls_while_timing": {name: c.calls for name, c in counters.items()},
            "token_requests": warm_requests,
            "token_requests_while_timing": server.token_requests - requests_before - warm_requests,
            "skipped": skipped,
        }
    finally:
        for name, manager in managers.items():
            if name in tokens:  # drop our Redis key and token file
                await manager.invalidate(tokens[name].access_token)
            await manager.aclose()
        shutil.rmtree(directory, ignore_errors=True)


async def peers(cfg: Config, sample_header: str) -> dict[str, Any]:
    """The same loop around what other libraries do per call, next to the same floor."""
    subjects: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    cleanups: list[Any] = []
    try:
        try:
            with warnings.catch_warnings():  # authlib warns about its httpx module at import
                warnings.simplefilter("ignore")
                from authlib.integrations.httpx_client import (  # type: ignore[import-untyped]
                    AsyncOAuth2Client,
                )
        except ImportError as exc:
            skipped["authlib"] = f"authlib/httpx not installed ({exc})"
        else:
            client = AsyncOAuth2Client(
                "client-id",
                "client-secret",
                token={
                    "access_token": sample_header.split(" ", 1)[1],
                    "token_type": "Bearer",
                    # is_expired() checks an int expires_at; valid for another hour.
                    "expires_at": int(time.time()) + 3600,
                },
                grant_type="client_credentials",
            )
            cleanups.append(client.aclose)
            # What AsyncOAuth2Client.request() runs before every request with a valid
            # token: take an anyio Lock, check expiry, release. (It builds no header.)
            subjects["authlib ensure_active_token"] = partial(
                client.ensure_active_token, client.token
            )

        why = await redis_available(cfg.redis_url)
        if why is not None:
            skipped["redis GET"] = why
        else:
            import redis.asyncio as aioredis

            rclient = aioredis.from_url(cfg.redis_url)
            rkey = f"cl_tokens_bench:{secrets.token_hex(8)}"
            await rclient.set(rkey, sample_header, px=600_000)

            async def drop_redis_key() -> None:
                await rclient.delete(rkey)
                await rclient.aclose()

            cleanups.append(drop_redis_key)
            subjects["redis GET"] = partial(rclient.get, rkey)

        token = sample_header.split(" ", 1)[1]

        async def fetch() -> tuple[str, float]:
            return token, 7200.0

        hand_written = HandWrittenCache(fetch)
        await hand_written.header()  # warm
        subjects["hand-written 25-line single flight (clock per call, new dict)"] = (
            hand_written.header
        )

        try:
            from aiocache import SimpleMemoryCache  # type: ignore[import-untyped]
        except ImportError as exc:
            skipped["aiocache"] = f"aiocache not installed ({exc})"
        else:
            default = SimpleMemoryCache()  # timeout=5 s: every get runs in asyncio.wait_for
            untimed = SimpleMemoryCache(timeout=None)
            for cache in (default, untimed):
                await cache.set("header", sample_header)
            subjects["aiocache get (default timeout)"] = partial(default.get, "header")
            subjects["aiocache get (timeout=None)"] = partial(untimed.get, "header")

        loops = {name: loop_of(fn) for name, fn in subjects.items()}
        results = await measure_paired(loops, loop_of(make_floor(sample_header)), cfg)
        return {
            "peers": {name: paired.as_dict() for name, paired in results.items()},
            "skipped": skipped,
        }
    finally:
        for cleanup in cleanups:
            await cleanup()


class HandWrittenCache:
    """The cheap peer: the token cache a user writes in 25 lines instead of a library.

    One token, a single flight for its fetch, the clock read on every call, a new dict
    returned. No shared backend, no refresh ahead, no retries: what it does per warm
    call is the least a correct cache can do, so it shows what the manager's extra
    guarantees cost on the hot path.
    """

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]]) -> None:
        self._fetch = fetch  # returns (access token, lifetime in seconds)
        self._header = ""
        self._good_until = 0.0
        self._flight: asyncio.Future[None] | None = None

    async def header(self) -> dict[str, str]:
        if time.monotonic() < self._good_until:
            return {"Authorization": self._header}
        if self._flight is None:
            self._flight = asyncio.ensure_future(self._refresh())
        flight = self._flight
        await asyncio.shield(flight)
        return {"Authorization": self._header}

    async def _refresh(self) -> None:
        try:
            sent = time.monotonic()
            token, lifetime = await self._fetch()
            self._header = f"Bearer {token}"
            self._good_until = sent + lifetime - min(30.0, lifetime / 4)
        finally:
            self._flight = None


class _SeedBackend(TokenBackend):
    """Hands out a new valid token for any key and stores nothing.

    Filling a manager with 10,000 scopes through a token server would take minutes;
    read from this backend, each scope costs one slow-path call and no request, and the
    manager builds and keeps the same objects it keeps for a fetched token.
    """

    def __init__(self, template: str, keys: CredentialKeys, lifetime: float = 7200.0) -> None:
        self._template = template[:-16]  # the tail is replaced to make every token distinct
        self._keys = keys
        self._lifetime = lifetime

    async def get(self, key: str) -> Token | None:
        token = Token(
            access_token=self._template + secrets.token_hex(8),
            token_type="Bearer",
            scope=None,
            expires_at=time.time() + self._lifetime,
            lifetime=self._lifetime,
        )
        # Sealed with the credential's MAC as a real writer does: an unsealed value is
        # ignored (with a warning) and the manager would fetch each scope instead.
        return dataclasses.replace(token, seal=self._keys.seal(key, token))

    async def set(self, key: str, token: Token) -> None:
        return None

    async def delete(self, key: str, access_token: str | None = None) -> bool:
        return False

    async def acquire_lock(self, key: str, *, lease: float) -> LockHandle | None:
        return LockHandle(key, "seed")

    async def release_lock(self, handle: LockHandle) -> None:
        return None


def _scopes(n: int) -> list[str]:
    return [f"market:code:bench-{i:05d}" for i in range(n)]


async def scale(cfg: Config, server: FakeAuthServer, template: str) -> dict[str, Any]:
    """Warm ``header(scope)`` with 1, 100 and 10,000 scopes cached, and memory per token.

    Both the subject and its floor cycle over the same scope sequence, and the floor's
    dict has as many entries as the manager's hot tier, so the ratio shows what the
    manager adds as the cache grows, and ns(N)/ns(1) how much the call itself grows.
    """
    sizes: dict[str, Any] = {}
    requests_before = server.token_requests
    for n in cfg.scale_sizes:
        scopes = _scopes(n)
        manager = TokenManager(
            server.client_id,
            server.client_secret,
            auth_url=server.url,
            backend=_SeedBackend(
                template,
                credential_keys(server.url, server.client_id, server.client_secret),
            ),
        )
        try:
            for scope in scopes:
                await manager.header(scope)
            table = {scope: (await manager.header(scope))["Authorization"] for scope in scopes}
            floor = scoped_loop_of(_scoped_floor(table), scopes)
            header = scoped_loop_of(manager.header, scopes)
            await floor(min(cfg.calls, 20_000))  # warm up
            await header(min(cfg.calls, 20_000))
            paired = Paired(f"{n} scopes", cfg.calls, cfg.calls)
            for round_no in range(cfg.rounds):
                first = "floor" if round_no % 2 == 0 else "subject"
                paired.add(await paired_round(floor, header, cfg.calls, cfg.calls, first=first))
            sizes[str(n)] = paired.as_dict()
        finally:
            await manager.aclose()
    one = sizes[str(cfg.scale_sizes[0])]["subject_ns_median"]
    for entry in sizes.values():
        entry["growth_vs_smallest"] = entry["subject_ns_median"] / one
    memory = await _memory_per_token(cfg, server, template)
    return {
        "sizes": sizes,
        "memory": memory,
        "token_requests": server.token_requests - requests_before,
    }


def _scoped_floor(d: dict[str, str]) -> Any:
    """The floor with a scope argument, over a dict as large as the manager's hot tier."""

    async def floor(scope: str) -> dict[str, str]:
        return {"Authorization": d[scope]}

    return floor


def _real_size_jwt(scope: str) -> str:
    """A token the size of a real Commerce Layer one (about 1 KB): RS512 signature of a
    2048-bit key, and the claims an integration token carries."""
    now = int(time.time())
    claims = {
        "organization": {
            "id": "WXlEOFrjnr",
            "slug": "the-blue-brand-3",
            "enterprise": True,
            "region": "eu-west-1",
        },
        "application": {"id": "DNOPYiZYpn", "kind": "integration", "public": False},
        "market": {
            "id": ["BjQzjhmzxg"],
            "stock_location_ids": ["KLDepuQNnk"],
            "geocoder_id": None,
            "allows_external_prices": False,
        },
        "scope": scope,
        "exp": now + 14400,
        "test": True,
        "rand": secrets.randbelow(10**18) / 10**18,
        "iat": now,
        "iss": "https://auth.commercelayer.io",
    }
    header = {"alg": "RS512", "typ": "JWT", "kid": secrets.token_hex(20)}

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join(
        (
            b64(json.dumps(header).encode()),
            b64(json.dumps(claims).encode()),
            b64(secrets.token_bytes(256)),
        )
    )


async def _memory_per_token(cfg: Config, server: FakeAuthServer, template: str) -> dict[str, Any]:
    """tracemalloc's view of what a manager keeps per cached scope, next to the floor.

    The manager has its default backend (a private memory://), which counts: it holds
    the tokens too. Each scope is a real fetch path but for the socket: the POST is
    answered in-process with a Commerce Layer body carrying a real-size token, parsed
    by the manager's own endpoint code (10,000 signed tokens from the fake server would
    take minutes). The floor, in the same run: a dict of the same header strings.
    """
    import cl_tokens._endpoint as endpoint

    n = cfg.memory_tokens
    scopes = _scopes(n)

    async def answer(*_args: Any, body: Any, **_kwargs: Any) -> Answer:
        scope = body.get("scope") or "market:all"
        data = {
            "access_token": _real_size_jwt(scope),
            "token_type": "bearer",
            "expires_in": 14400,
            "scope": scope,
            "created_at": int(time.time()),
        }
        return Answer(200, "application/json", json.dumps(data).encode(), None)

    # The endpoint module's own name for the POST (setattr: it is not re-exported).
    real_post = getattr(endpoint, "post")  # noqa: B009
    setattr(endpoint, "post", answer)  # noqa: B010
    manager = TokenManager(server.client_id, server.client_secret, auth_url=server.url)
    try:
        await manager.header("market:code:warm-up")  # binds loop, session and keeper
        sample = [f"Bearer {_real_size_jwt(scope)}" for scope in scopes]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for scope in scopes:
                await manager.header(scope)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            floor_table = dict(zip(scopes, (value[:-1] + "x" for value in sample), strict=True))
            floor_after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        floor = (floor_after - after) / n
        per_token = (after - before) / n
        del floor_table
        return {
            "tokens": n,
            "bytes_total": after - before,
            "bytes_per_token": per_token,
            "floor_bytes_per_token": floor,
            "access_token_chars": len(sample[0]) - len("Bearer "),
            "backend": "memory:// (the default)",
            "note": "everything the manager keeps per scope, its default backend included: "
            "the Token, tier entry, hot-tier slots, resolved key; floor: a dict of the "
            "same header strings",
        }
    finally:
        setattr(endpoint, "post", real_post)  # noqa: B010
        await manager.aclose()
