"""Cold stampedes: 10,000 coroutines in one process, and 16 processes sharing a backend.

Both run against a ``FakeAuthServer(latency=0.05)`` in this process's event loop, so
the token endpoint answers in about 50 ms plus the HTTP exchange.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from cl_tokens import TokenManager
from cl_tokens.testing import FakeAuthServer

from ._common import Config, median, redis_available

__all__ = ["cold_stampede", "cross_process"]

ROOT = Path(__file__).resolve().parent.parent


def _manager(server: FakeAuthServer, **kwargs: Any) -> TokenManager:
    return TokenManager(server.client_id, server.client_secret, auth_url=server.url, **kwargs)


async def _single_fetch(server: FakeAuthServer) -> float:
    """Seconds for one cold ``header()`` on a fresh manager: the time of one fetch."""
    async with _manager(server) as manager:
        start = time.perf_counter()
        await manager.header()
        return time.perf_counter() - start


async def _stampede(manager: TokenManager, callers: int) -> tuple[float, list[float], set[str]]:
    """Start ``callers`` coroutines calling ``header()`` at once; when each was served."""

    async def caller() -> tuple[float, str]:
        header = await manager.header()
        return time.perf_counter(), header["Authorization"]

    start = time.perf_counter()
    done = await asyncio.gather(*(caller() for _ in range(callers)))
    return start, [t for t, _ in done], {h for _, h in done}


async def _asyncio_floor(server: FakeAuthServer, callers: int) -> tuple[float, list[float]]:
    """The same fan-out with nothing but asyncio: callers await one shared task (no
    shield, no single-flight bookkeeping) that does one cold fetch on a fresh manager."""
    manager = _manager(server)
    shared: asyncio.Future[dict[str, str]] | None = None

    async def caller() -> float:
        nonlocal shared
        if shared is None:
            shared = asyncio.ensure_future(manager.header())
        await shared
        return time.perf_counter()

    try:
        start = time.perf_counter()
        done = await asyncio.gather(*(caller() for _ in range(callers)))
        return start, list(done)
    finally:
        await manager.aclose()


async def cold_stampede(cfg: Config) -> dict[str, Any]:
    """``cfg.stampede_callers`` coroutines call ``header()`` at once on a cold manager.

    Per round, in this order: one cold fetch (the reference), the asyncio floor, the
    stampede. Reported: token requests per stampede, time until the last caller is
    served / one fetch, the same for the floor, and when the first caller was served.
    Peak memory is measured in a separate, untimed stampede under tracemalloc (which
    slows allocation down several times).
    """
    n = cfg.stampede_callers
    rounds: list[dict[str, Any]] = []
    async with FakeAuthServer(latency=cfg.stampede_latency) as server:
        for _ in range(cfg.stampede_rounds):
            single = await _single_fetch(server)
            f_start, f_done = await _asyncio_floor(server, n)
            before = server.token_requests
            async with _manager(server) as manager:
                s_start, s_done, headers = await _stampede(manager, n)
            rounds.append(
                {
                    "single_fetch_s": single,
                    "stampede_all_served_s": max(s_done) - s_start,
                    "stampede_first_served_s": min(s_done) - s_start,
                    "floor_all_served_s": max(f_done) - f_start,
                    "floor_first_served_s": min(f_done) - f_start,
                    "token_requests": server.token_requests - before,
                    "distinct_headers": len(headers),
                }
            )
        async with _manager(server) as manager:
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                await _stampede(manager, n)
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
    for r in rounds:
        r["ratio"] = r["stampede_all_served_s"] / r["single_fetch_s"]
        r["floor_ratio"] = r["floor_all_served_s"] / r["single_fetch_s"]
    return {
        "callers": n,
        "latency_s": cfg.stampede_latency,
        "rounds": rounds,
        "token_requests_max": max(r["token_requests"] for r in rounds),
        "distinct_headers_max": max(r["distinct_headers"] for r in rounds),
        "single_fetch_s_median": median([r["single_fetch_s"] for r in rounds]),
        "all_served_s_median": median([r["stampede_all_served_s"] for r in rounds]),
        "first_served_s_median": median([r["stampede_first_served_s"] for r in rounds]),
        "ratio_median": median([r["ratio"] for r in rounds]),
        "floor_all_served_s_median": median([r["floor_all_served_s"] for r in rounds]),
        "floor_ratio_median": median([r["floor_ratio"] for r in rounds]),
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
    """
    results: dict[str, Any] = {"processes": cfg.processes, "callers": cfg.callers_per_process}
    backends = ["file"]
    why = await redis_available(cfg.redis_url)
    if why is None:
        backends.append("redis")
    else:
        results["skipped"] = {"redis": why}
    async with FakeAuthServer(latency=cfg.stampede_latency) as server:
        for backend in backends:
            directory = tempfile.mkdtemp(prefix="cl-tokens-bench-xproc-")
            rounds = []
            try:
                for _ in range(cfg.xproc_rounds):
                    r = await _one_cross_process_round(cfg, server, backend, directory)
                    rounds.append(r)
                    if backend == "redis":
                        r["token_found_in_redis"] = await _drop_redis_token(cfg, server, r["scope"])
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            results[backend] = {
                "rounds": rounds,
                "token_requests_max": max(r["token_requests"] for r in rounds),
                "distinct_tokens_max": max(r["distinct_tokens"] for r in rounds),
                "wait_p50_s": median([r["wait_p50_s"] for r in rounds]),
                "wait_p99_s": median([r["wait_p99_s"] for r in rounds]),
                "wait_max_s": max(r["wait_max_s"] for r in rounds),
                "seen_p50_s": median([r["seen_p50_s"] for r in rounds]),
                "seen_max_s": max(r["seen_max_s"] for r in rounds),
                "token_written_after_go_s": median([r["token_written_after_go_s"] for r in rounds]),
            }
    return results


async def _drop_redis_token(cfg: Config, server: FakeAuthServer, scope: str) -> bool:
    """Delete the token the workers wrote to Redis, through the public API: read it back
    (no request if it is there), then invalidate it, which deletes only that key.
    Returns whether it was found in Redis."""
    async with _manager(server, scope=scope, backend=cfg.redis_url) as manager:
        before = server.token_requests
        token = await manager.token()
        await manager.invalidate(token.access_token)
        return server.token_requests == before
