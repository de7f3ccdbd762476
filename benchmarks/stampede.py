"""Cold stampedes: 10,000 coroutines in one process, and 16 processes sharing a backend.

Both run against a ``FakeAuthServer(latency=0.05)``: the in-process stampede against
one in another process (``benchmarks.remote``), so the token endpoint answers in about
50 ms plus the HTTP exchange and its work is not timed with the client's.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from cl_tokens import TokenManager
from cl_tokens.testing import FakeAuthServer

from ._common import Config, median, redis_available
from .fanout import pubsub_fanout_round
from .remote import RemoteServer

__all__ = ["cold_stampede", "cross_process"]

ROOT = Path(__file__).resolve().parent.parent


def _manager(server: Any, **kwargs: Any) -> TokenManager:
    return TokenManager(server.client_id, server.client_secret, auth_url=server.url, **kwargs)


def raw_post(session: aiohttp.ClientSession, server: Any) -> Callable[[], Awaitable[str]]:
    """One bare POST to the token endpoint, as a hand-written client would send it: the
    same JSON body and Accept header as the manager, the answer parsed, nothing else."""
    body = {
        "grant_type": "client_credentials",
        "client_id": server.client_id,
        "client_secret": server.client_secret,
    }
    headers = {"Accept": "application/json"}

    async def post() -> str:
        async with session.post(server.url, json=body, headers=headers) as response:
            answer = await response.json()
        return f"Bearer {answer['access_token']}"

    return post


async def _stampede(manager: TokenManager, callers: int) -> tuple[float, list[float], set[str]]:
    """Start ``callers`` coroutines calling ``header()`` at once; when each was served."""

    async def caller() -> tuple[float, str]:
        header = await manager.header()
        return time.perf_counter(), header["Authorization"]

    start = time.perf_counter()
    done = await asyncio.gather(*(caller() for _ in range(callers)))
    return start, [t for t, _ in done], {h for _, h in done}


async def _raw_post_floor(
    post: Callable[[], Awaitable[str]], callers: int
) -> tuple[float, list[float]]:
    """The same fan-out with nothing but asyncio and aiohttp: the first caller starts one
    raw POST, whose answer resolves one future that every caller awaits."""
    shared: asyncio.Future[dict[str, str]] | None = None
    task: asyncio.Task[None] | None = None

    async def fetch(future: asyncio.Future[dict[str, str]]) -> None:
        try:
            future.set_result({"Authorization": await post()})
        except Exception as exc:  # pragma: no cover - the server is local
            future.set_exception(exc)

    async def caller() -> float:
        nonlocal shared, task
        if shared is None:
            shared = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(fetch(shared))
        await shared
        return time.perf_counter()

    start = time.perf_counter()
    done = await asyncio.gather(*(caller() for _ in range(callers)))
    return start, list(done)


async def _safe_floor(
    post: Callable[[], Awaitable[str]], callers: int
) -> tuple[float, list[float]]:
    """The floor made safe to cancel, as a library must be: each caller awaits a future
    of its own, all settled when the one raw POST answers (what ``asyncio.shield`` does,
    without its second future). Awaited directly, one shared future is cancelled for
    everyone by the first caller that is cancelled."""
    waiters: list[asyncio.Future[dict[str, str]]] = []
    task: asyncio.Task[None] | None = None

    async def fetch() -> None:
        header = {"Authorization": await post()}
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(header)

    async def caller() -> float:
        nonlocal task
        if task is None:
            task = asyncio.ensure_future(fetch())
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        await waiter
        return time.perf_counter()

    start = time.perf_counter()
    done = await asyncio.gather(*(caller() for _ in range(callers)))
    return start, list(done)


async def cold_stampede(cfg: Config) -> dict[str, Any]:
    """``cfg.stampede_callers`` coroutines call ``header()`` at once on a cold manager,
    next to the raw-POST floor: as many coroutines awaiting one future that one raw
    aiohttp POST resolves.

    The token server runs in another process (``benchmarks.remote``) with
    ``cfg.stampede_latency``, so its work is not on this event loop. Both sides use one
    aiohttp session, opened and connected before timing, so neither pays a TCP connect;
    each stampede gets a fresh manager (cold). Who goes first alternates by round.
    Peak memory is measured in a separate, untimed stampede under tracemalloc (which
    slows allocation down several times).
    """
    n = cfg.stampede_callers
    rounds: list[dict[str, Any]] = []
    async with (
        RemoteServer(latency=cfg.stampede_latency) as server,
        aiohttp.ClientSession() as session,
    ):
        post = raw_post(session, server)
        await post()  # connect
        for round_no in range(cfg.stampede_rounds):
            r: dict[str, Any] = {}
            sides = ["floor", "stampede", "safe floor"]
            sides = sides[round_no % 3 :] + sides[: round_no % 3]  # each position in turn
            for side in sides:
                gc.collect()
                if side == "floor":
                    f_start, f_done = await _raw_post_floor(post, n)
                    r["floor_all_served_s"] = max(f_done) - f_start
                    r["floor_first_served_s"] = min(f_done) - f_start
                    continue
                if side == "safe floor":
                    f_start, f_done = await _safe_floor(post, n)
                    r["safe_floor_all_served_s"] = max(f_done) - f_start
                    continue
                before = await server.requests()
                async with _manager(server, session=session) as manager:
                    s_start, s_done, headers = await _stampede(manager, n)
                r["stampede_all_served_s"] = max(s_done) - s_start
                r["stampede_first_served_s"] = min(s_done) - s_start
                r["token_requests"] = await server.requests() - before
                r["distinct_headers"] = len(headers)
            r["ratio"] = r["stampede_all_served_s"] / r["floor_all_served_s"]
            r["safe_floor_ratio"] = r["safe_floor_all_served_s"] / r["floor_all_served_s"]
            r["ratio_to_safe_floor"] = r["stampede_all_served_s"] / r["safe_floor_all_served_s"]
            rounds.append(r)
        async with _manager(server, session=session) as manager:
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                await _stampede(manager, n)
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
    return {
        "callers": n,
        "latency_s": cfg.stampede_latency,
        "server": "FakeAuthServer in another process (benchmarks.remote)",
        "rounds": rounds,
        "token_requests_max": max(r["token_requests"] for r in rounds),
        "distinct_headers_max": max(r["distinct_headers"] for r in rounds),
        "all_served_s_median": median([r["stampede_all_served_s"] for r in rounds]),
        "first_served_s_median": median([r["stampede_first_served_s"] for r in rounds]),
        "floor_all_served_s_median": median([r["floor_all_served_s"] for r in rounds]),
        "floor_first_served_s_median": median([r["floor_first_served_s"] for r in rounds]),
        "ratio_median": median([r["ratio"] for r in rounds]),
        "safe_floor_all_served_s_median": median([r["safe_floor_all_served_s"] for r in rounds]),
        "safe_floor_ratio_median": median([r["safe_floor_ratio"] for r in rounds]),
        "ratio_to_safe_floor_median": median([r["ratio_to_safe_floor"] for r in rounds]),
        "peak_bytes": peak,
        "peak_bytes_per_caller": peak / n,
    }


# -- cross-process -------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def _start_worker(args: list[str]) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.worker",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
        env=env,
    )


async def _one_cross_process_round(
    cfg: Config, server: FakeAuthServer, backend: str, directory: str
) -> dict[str, Any]:
    scope = f"market:code:bench-{secrets.token_hex(6)}"  # a cold key of its own
    target = directory if backend == "file" else cfg.redis_url
    args = [
        "--auth-url", server.url,
        "--client-id", server.client_id,
        "--client-secret", server.client_secret or "",
        "--scope", scope,
        "--backend", backend,
        "--target", target,
        "--callers", str(cfg.callers_per_process),
    ]  # fmt: skip
    procs = [await _start_worker(args) for _ in range(cfg.processes)]
    try:
        # Barrier: every worker has imported everything, built its manager and (Redis)
        # connected, then waits for one shared start time, a little in the future.
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            if line.strip() != b"READY":
                raise RuntimeError(f"worker did not get ready: {line!r}")
        before = server.token_requests
        go = time.time() + 0.25
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{go!r}\n".encode())
            await proc.stdin.drain()
            proc.stdin.close()
        outputs = await asyncio.wait_for(
            asyncio.gather(*(proc.communicate() for proc in procs)), 120
        )
    except BaseException:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        raise
    requests = server.token_requests - before
    reports: list[dict[str, Any]] = []
    warnings: list[str] = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed ({proc.returncode}): {err.decode()[-2000:]}")
        lines = [x for x in out.decode().splitlines() if x.startswith("RESULT ")]
        reports.append(json.loads(lines[-1][len("RESULT ") :]))
        warnings += [x for x in err.decode().splitlines() if x.strip()]
    writers = [r for r in reports if r["written_at"] is not None]
    others = [r for r in reports if r["written_at"] is None]
    first_served = min(min(r["served_at"]) for r in reports)
    # "Token written": the first moment the token was certainly in the backend: when
    # the winner's backend.set() returned, or, if earlier, when another process first
    # read it back (a writer descheduled right after its write returns late).
    # Without a writer (should not happen): when the first caller anywhere was served.
    marks = [r["written_at"] for r in writers] + [r["seen_at"] for r in others if r["seen_at"]]
    t_written = min(marks) if marks else first_served
    waits = [t - t_written for r in others for t in r["served_at"]]
    per_process = [max(r["served_at"]) - t_written for r in others]
    # When each other process's flight read the token from the backend: propagation
    # alone, before that process wakes its own callers.
    seen = [r["seen_at"] - t_written for r in others if r["seen_at"] is not None]
    return {
        "scope": scope,
        "token_requests": requests,
        "writers": len(writers),
        "distinct_tokens": len({r["token_digest"] for r in reports}),
        "calls": sum(len(r["served_at"]) for r in reports),
        "token_written_after_go_s": t_written - go,
        "first_fetch_server_latency_s": server.latency,
        "wait_p50_s": _percentile(waits, 50) if waits else None,
        "wait_p99_s": _percentile(waits, 99) if waits else None,
        "wait_max_s": max(waits) if waits else None,
        "process_done_p50_s": _percentile(per_process, 50) if per_process else None,
        "process_done_max_s": max(per_process) if per_process else None,
        "seen_p50_s": _percentile(seen, 50) if seen else None,
        "seen_max_s": max(seen) if seen else None,
        "processes_without_a_read": len(others) - len(seen),
        "worker_start_spread_s": max(r["started_at"] for r in reports)
        - min(r["started_at"] for r in reports),
        "warnings": warnings[:20],
    }


async def cross_process(cfg: Config) -> dict[str, Any]:
    """``cfg.processes`` processes × ``cfg.callers_per_process`` coroutines, cold, at once.

    For the file and the redis backend, each round uses a scope never used before, so
    the key is cold everywhere. The winner is the process whose backend ``set()`` ran;
    the others' waits are measured from the moment that ``set()`` returned.

    Next to each round, the floor (with Redis): a bare pub/sub fan-out to as many
    processes, each waking as many coroutines (``benchmarks.fanout``). Rounds take turns
    (floor, file, redis; then in reverse order), so load from elsewhere lands on all.
    """
    results: dict[str, Any] = {"processes": cfg.processes, "callers": cfg.callers_per_process}
    backends = ["file"]
    why = await redis_available(cfg.redis_url)
    if why is None:
        backends += ["redis", "pubsub_floor"]
    else:
        results["skipped"] = {"redis": why, "pubsub_floor": why}
    rounds: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    directory = tempfile.mkdtemp(prefix="cl-tokens-bench-xproc-")
    try:
        async with FakeAuthServer(latency=cfg.stampede_latency) as server:
            for round_no in range(cfg.xproc_rounds):
                for backend in backends if round_no % 2 == 0 else backends[::-1]:
                    if backend == "pubsub_floor":
                        rounds[backend].append(
                            await pubsub_fanout_round(
                                cfg.redis_url,
                                cfg.processes,
                                cfg.callers_per_process,
                                payload_bytes=len(_SAMPLE_VALUE),
                            )
                        )
                        continue
                    r = await _one_cross_process_round(cfg, server, backend, directory)
                    rounds[backend].append(r)
                    if backend == "redis":
                        r["token_found_in_redis"] = await _drop_redis_token(cfg, server, r["scope"])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if "pubsub_floor" in rounds:
        floor_rounds = rounds.pop("pubsub_floor")
        results["pubsub_floor"] = {
            "rounds": floor_rounds,
            "payload_bytes": len(_SAMPLE_VALUE),
            "wait_p50_s": median([r["wait_p50_s"] for r in floor_rounds]),
            "wait_p99_s": median([r["wait_p99_s"] for r in floor_rounds]),
            "wait_max_s": max(r["wait_max_s"] for r in floor_rounds),
            "received_p50_s": median([r["received_p50_s"] for r in floor_rounds]),
            "received_p99_s": median([r["received_p99_s"] for r in floor_rounds]),
        }
    for backend, rs in rounds.items():
        results[backend] = {
            "rounds": rs,
            "token_requests_max": max(r["token_requests"] for r in rs),
            "distinct_tokens_max": max(r["distinct_tokens"] for r in rs),
            "wait_p50_s": median([r["wait_p50_s"] for r in rs]),
            "wait_p99_s": median([r["wait_p99_s"] for r in rs]),
            "wait_max_s": max(r["wait_max_s"] for r in rs),
            "seen_p50_s": median([r["seen_p50_s"] for r in rs]),
            "seen_max_s": max(r["seen_max_s"] for r in rs),
            "token_written_after_go_s": median([r["token_written_after_go_s"] for r in rs]),
        }
        floor = results.get("pubsub_floor")
        if floor:
            # Round by round, each backend's p99 over the floor's p99 of the same round.
            per_round = [
                r["wait_p99_s"] / f["wait_p99_s"] for r, f in zip(rs, floor["rounds"], strict=True)
            ]
            results[backend]["p99_ratio_to_floor_median"] = median(per_round)
            results[backend]["p99_ratios_to_floor"] = per_round
    return results


# About the size of a stored Commerce Layer token (encrypted and MAC'd): what a pub/sub
# message that carries the token itself would carry.
_SAMPLE_VALUE = "x" * 1_100


async def _drop_redis_token(cfg: Config, server: FakeAuthServer, scope: str) -> bool:
    """Delete the token the workers wrote to Redis, through the public API: read it back
    (no request if it is there), then invalidate it, which deletes only that key.
    Returns whether it was found in Redis."""
    async with _manager(server, scope=scope, backend=cfg.redis_url) as manager:
        before = server.token_requests
        token = await manager.token()
        await manager.invalidate(token.access_token)
        return server.token_requests == before
