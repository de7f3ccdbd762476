"""Several hosts sharing one Redis (``--only hosts``; opt-in: it needs root).

Three network namespaces stand in for three hosts, four worker processes each
(``benchmarks.host_worker``), and a fourth namespace runs a Redis server of the run's
own; the fake token server runs in this process, on the bridge that joins them (see
``benchmarks._netns``). Every worker has a TokenManager on ``redis://<redis>:6379/0``
and 50 coroutines. Measured, counting requests at the token server:

1. **cold**: every coroutine on every host calls ``header()`` at once on a scope never
   used before (ideal: 1 request);
2. **invalidation**: the API starts rejecting the token (``server.expire``); every
   coroutine on every host calls the API at once, gets a 401, invalidates exactly the
   token it sent and calls again (ideal: 1 request per round, and every caller ends on
   the same new token);
3. **partition**: 4 coroutines per worker call the API every 0.2 s (each API request
   may take 2 s); after 3 s one host's link goes down for 5 s, and half a second into
   the cut the API starts rejecting the token. A control run does the same without the
   cut, for comparison. The other hosts must carry on as if
   nothing happened (one request between them, no failed call); the cut host fails its
   API calls while cut off (its callers have no network) and, once back, takes the new
   token from Redis without a request of its own.

Where namespaces cannot be made (not root, no ``ip``, no ``redis-server``), it is skipped
with the reason, which the results record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections import Counter, deque
from typing import Any

from cl_tokens.testing import FakeAuthServer

from ._common import Config, median
from ._netns import Topology, topology, unavailable
from .host_worker import digest
from .stampede import ROOT, _percentile

__all__ = ["hosts"]

HOSTS = ("h1", "h2", "h3")
WORKERS_PER_HOST = 4
CALLERS = 50
REDIS_PORT = 6379
API_TIMEOUT = 30.0  # per API request in the invalidation rounds: 1,200 at once, 2 cores
LOAD_CALLERS = 4  # per worker, in the partition phase: 48 callers, about 240 API calls/s
LOAD_PACE = 0.2
# Short enough that a cut-off host's callers give up within the cut (TCP alone would
# retry for minutes), long enough that a loaded machine's slow answer is not a failure.
LOAD_TIMEOUT = 2.0
WARM_UP, BEFORE_CUT, CUT, AFTER_CUT = 1.0, 2.0, 5.0, 4.0
EXPIRE_INTO_CUT = 0.5
WINDOWS = ("before", "cut", "after")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]   hosts: {message}", file=sys.stderr, flush=True)


async def hosts(cfg: Config) -> dict[str, Any]:
    why = unavailable()
    if why is not None:
        _log(f"skipped: {why}")
        return {"skipped": why}
    with topology(("redis", *HOSTS)) as topo:
        return await _run(cfg, topo)


class _Worker:
    def __init__(self, host: str, proc: asyncio.subprocess.Process) -> None:
        self.host = host
        self.proc = proc
        self.stderr: deque[str] = deque(maxlen=20)
        self.drain = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        # A worker that logs more than a pipe holds would block on its next warning.
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())

    async def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()

    async def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            await asyncio.sleep(0.1)  # let the drain catch the last words
            tail = " | ".join(self.stderr)
            raise RuntimeError(f"worker on {self.host} exited ({self.proc.returncode}): {tail}")
        return raw.decode().strip()

    async def result(self, timeout: float = 120.0) -> dict[str, Any]:
        line = await self.line(timeout)
        if not line.startswith("RESULT "):
            raise RuntimeError(f"worker on {self.host} said {line[:200]!r}")
        answer: dict[str, Any] = json.loads(line[len("RESULT ") :])
        answer["host"] = self.host
        return answer


async def _all(workers: list[_Worker], command: dict[str, Any]) -> list[dict[str, Any]]:
    for w in workers:
        await w.send(command)
    return list(await asyncio.gather(*(w.result() for w in workers)))


async def _start_redis(topo: Topology) -> asyncio.subprocess.Process:
    address = topo.addresses["redis"]
    proc = await asyncio.create_subprocess_exec(
        *topo.exec_args("redis"), "redis-server",
        "--bind", address, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
        "--protected-mode", "no", "--daemonize", "no",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, REDIS_PORT), 1)
        except (OSError, asyncio.TimeoutError):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not start in {topo.namespace('redis')}"
                ) from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return proc


async def _start_worker(
    topo: Topology, host: str, server: FakeAuthServer, redis_url: str, scope: str
) -> _Worker:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        *topo.exec_args(host), sys.executable, "-m", "benchmarks.host_worker",
        "--auth-url", server.url.replace(topo.gateway, "localhost"),
        "--token-host", topo.gateway,
        "--api-url", f"{server.api_url}/skus",
        "--client-id", server.client_id,
        "--client-secret", server.client_secret or "",
        "--scope", scope,
        "--redis-url", redis_url,
        "--callers", str(CALLERS),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(ROOT), env=env, limit=2**24,
    )  # fmt: skip
    return _Worker(host, proc)


async def _run(cfg: Config, topo: Topology) -> dict[str, Any]:
    redis = await _start_redis(topo)
    workers: list[_Worker] = []
    try:
        redis_url = f"redis://{topo.addresses['redis']}:{REDIS_PORT}/0"
        async with FakeAuthServer(host=topo.gateway, latency=cfg.stampede_latency) as server:
            scope = f"market:code:hosts-{secrets.token_hex(4)}"
            for host in HOSTS:
                for _ in range(WORKERS_PER_HOST):
                    workers.append(await _start_worker(topo, host, server, redis_url, scope))
            for w in workers:
                line = await w.line(120)
                if line != "READY":
                    raise RuntimeError(f"worker on {w.host} did not get ready: {line[:200]!r}")
            results: dict[str, Any] = {
                "hosts": len(HOSTS),
                "workers_per_host": WORKERS_PER_HOST,
                "callers_per_worker": CALLERS,
                "server_latency_s": server.latency,
                "redis": "redis-server in a namespace of its own, redis://<its address>:6379/0",
                "topology": "one bridge; a veth per namespace; the token server on the bridge",
            }
            _log(f"{len(workers)} workers ready in {', '.join(HOSTS)}; cold rounds")
            results["cold"] = await _cold(server, workers, scope, 1 if cfg.quick else 3)
            # The application's HTTP connections to the API, opened as a running service
            # has them: the invalidation rounds then time the library, not TCP set-ups.
            warm = await _all(workers, {"op": "api", "at": time.time() + 0.3, "timeout": 30})
            results["api_warm_up"] = {
                "outcomes": _merge([a["outcomes"] for a in warm]),
                "token_requests": sum(a["token_requests"] for a in warm),
            }
            _log("invalidation rounds")
            results["invalidation"] = await _invalidation(server, workers, 2 if cfg.quick else 5)
            _log(f"partition: {HOSTS[-1]} cut off for {CUT:g} s under load")
            # The same load and token change without a cut first: what "unaffected"
            # means for the other hosts, measured on this machine in this run.
            results["partition_control"] = await _partition(server, workers, topo, None)
            results["partition"] = await _partition(server, workers, topo, HOSTS[-1])
            for w in workers:
                await w.send({"op": "quit"})
            await asyncio.wait_for(asyncio.gather(*(w.proc.wait() for w in workers)), 30)
            results["worker_stderr_tail"] = [line for w in workers for line in w.stderr][:20]
            return results
    finally:
        for w in workers:
            if w.proc.returncode is None:
                w.proc.kill()
                await w.proc.wait()
            w.drain.cancel()
        if redis.returncode is None:
            redis.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(redis.wait(), 5)
            if redis.returncode is None:
                redis.kill()
                await redis.wait()


def _expire_all(server: FakeAuthServer) -> None:
    """The API rejects every token issued so far, whichever each worker holds."""
    for token in server.issued:
        server.expire(token)


def _live(server: FakeAuthServer) -> set[str]:
    """Digests (as the workers report them) of the tokens the API accepts now."""
    return {digest(f"Bearer {t}") for t in server.issued if server.is_live(t)}


def _merge(counters: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c)
    return dict(total)


def _per_host(answers: list[dict[str, Any]], key: str = "token_requests") -> dict[str, int]:
    out = dict.fromkeys(HOSTS, 0)
    for a in answers:
        out[a["host"]] += a[key]
    return out


async def _cold(
    server: FakeAuthServer, workers: list[_Worker], scope: str, rounds: int
) -> dict[str, Any]:
    out = []
    # The workers' own scope comes last: the invalidation rounds start from its token.
    for k in range(rounds):
        round_scope = scope if k == rounds - 1 else f"{scope}-cold{k}"
        before = server.token_requests
        answers = await _all(
            workers, {"op": "burst", "at": time.time() + 0.3, "scope": round_scope}
        )
        latencies = [s for a in answers for s in a["latencies"]]
        out.append(
            {
                "token_requests": server.token_requests - before,
                "token_requests_by_host": _per_host(answers),
                "distinct_tokens": len(_merge([a["digests"] for a in answers])),
                "failures": _merge([a["failures"] for a in answers]),
                "library_warnings": _merge([a["warnings"] for a in answers]),
                "callers": len(latencies),
                "served_p50_s": _percentile(latencies, 50),
                "served_max_s": max(latencies),
            }
        )
    return {
        "rounds": out,
        "token_requests": [r["token_requests"] for r in out],
        "library_warnings": [sum(r["library_warnings"].values()) for r in out],
        "clean": all(r["distinct_tokens"] == 1 and not r["failures"] for r in out),
    }


async def _invalidation(
    server: FakeAuthServer, workers: list[_Worker], rounds: int
) -> dict[str, Any]:
    out = []
    for _ in range(rounds):
        _expire_all(server)
        before = server.token_requests
        command = {"op": "api", "at": time.time() + 0.3, "timeout": API_TIMEOUT}
        answers = await _all(workers, command)
        latencies = [s for a in answers for s in a["latencies"]]
        outcomes = _merge([a["outcomes"] for a in answers])
        served = _merge([a["digests"] for a in answers])
        headers = [s for a in answers for s in a["header_latencies"]]
        out.append(
            {
                "token_requests": server.token_requests - before,
                "token_requests_by_host": _per_host(answers),
                "outcomes": outcomes,
                "library_warnings": _merge([a["warnings"] for a in answers]),
                "distinct_tokens": len(served),
                "new_token_live": set(served) <= _live(server),
                "callers": len(latencies),
                "call_p50_s": _percentile(latencies, 50),
                "call_max_s": max(latencies),
                # header() alone, both calls of a caller: the token change itself, apart
                # from the two API requests on a loaded machine.
                "header_p50_s": _percentile(headers, 50),
                "header_max_s": max(headers),
            }
        )
    return {
        "rounds": out,
        "token_requests": [r["token_requests"] for r in out],
        "library_warnings": [sum(r["library_warnings"].values()) for r in out],
        "clean": all(
            r["distinct_tokens"] == 1
            and r["new_token_live"]
            and set(r["outcomes"]) == {"ok-after-401"}
            for r in out
        ),
    }


async def _partition(
    server: FakeAuthServer, workers: list[_Worker], topo: Topology, cut: str | None
) -> dict[str, Any]:
    """Load on every host; ``cut`` (None: nobody, for the control run) is cut off for
    ``CUT`` seconds, and the token expires ``EXPIRE_INTO_CUT`` seconds into that."""
    before = server.token_requests
    start = time.time() + 0.5
    until = start + WARM_UP + BEFORE_CUT + CUT + AFTER_CUT
    command = {
        "op": "load",
        "at": start,
        "until": until,
        "callers": LOAD_CALLERS,
        "pace": LOAD_PACE,
        "timeout": LOAD_TIMEOUT,
    }
    for w in workers:
        await w.send(command)
    await asyncio.sleep(start + WARM_UP + BEFORE_CUT - time.time())
    cut_at = time.time()
    if cut is not None:
        await topo.set_link(cut, up=False)
    try:
        await asyncio.sleep(EXPIRE_INTO_CUT)
        _expire_all(server)
        expired_at = time.time()
        await asyncio.sleep(cut_at + CUT - time.time())
    finally:
        if cut is not None:
            await topo.set_link(cut, up=True)
    restored_at = time.time()
    answers = list(await asyncio.gather(*(w.result(until - time.time() + 60) for w in workers)))
    served_after = {
        digest
        for a in answers
        for started, *_, outcome, digest in a["calls"]
        if started >= restored_at and outcome.startswith("ok")
    }
    by_host: dict[str, Any] = {}
    for host in HOSTS:
        calls = [c for a in answers if a["host"] == host for c in a["calls"]]
        by_host[host] = {
            "token_requests": sum(a["token_requests"] for a in answers if a["host"] == host),
            "library_warnings": _merge([a["warnings"] for a in answers if a["host"] == host]),
            **_windows(calls, start + WARM_UP, cut_at, restored_at),
        }
        # How long after the API started rejecting the old token each host's callers
        # were all on the new one: the last call that had to retry after a 401.
        retried = [c[0] + c[2] for c in calls if c[3] == "ok-after-401"]
        by_host[host]["last_401_retry_done_after_expiry_s"] = (
            max(retried) - expired_at if retried else None
        )
    others = [h for h in HOSTS if h != cut]
    summary = {
        "cut_host": cut,
        "cut_s": restored_at - cut_at,
        "expired_after_cut_s": expired_at - cut_at,
        "load_callers_per_worker": LOAD_CALLERS,
        "pace_s": LOAD_PACE,
        "token_requests": server.token_requests - before,
        "new_token_live": bool(served_after) and served_after <= _live(server),
        "hosts": by_host,
        "others_failed_calls": sum(
            by_host[h][w]["failed"] for h in others for w in ("before", "cut", "after")
        ),
    }
    if cut is not None:
        summary["cut_host_failed_calls"] = {w: by_host[cut][w]["failed"] for w in WINDOWS}
        summary["cut_host_header_failures"] = sum(by_host[cut][w]["header_failed"] for w in WINDOWS)
    return summary


def _windows(
    calls: list[list[Any]], warm: float, cut_at: float, restored_at: float
) -> dict[str, dict[str, Any]]:
    """Calls (started, header() s, total s, outcome) by when they ran: ``before`` the
    cut, during it (any of the call overlapped it), ``after`` it. Calls started in the
    warm-up, when every caller starts at once, are left out."""
    sorted_calls: dict[str, list[list[Any]]] = {w: [] for w in WINDOWS}
    for c in calls:
        started, ended = c[0], c[0] + c[2]
        if started < warm:
            continue
        if started >= restored_at:
            sorted_calls["after"].append(c)
        elif ended >= cut_at:
            sorted_calls["cut"].append(c)
        else:
            sorted_calls["before"].append(c)
    return {w: _summary(inside) for w, inside in sorted_calls.items()}


def _summary(inside: list[list[Any]]) -> dict[str, Any]:
    totals = [c[2] for c in inside]
    headers = [c[1] for c in inside]
    outcomes = Counter(c[3] for c in inside)
    failed = sum(n for o, n in outcomes.items() if not o.startswith("ok"))
    plain = [c[2] for c in inside if c[3] == "ok"]
    retried = [c[2] for c in inside if c[3] == "ok-after-401"]
    return {
        "calls": len(inside),
        "failed": failed,
        "header_failed": sum(n for o, n in outcomes.items() if o.startswith("header-failed")),
        "outcomes": dict(outcomes),
        "call_p50_s": median(totals) if totals else None,
        "call_p99_s": _percentile(totals, 99) if totals else None,
        "call_max_s": max(totals) if totals else None,
        "header_p99_s": _percentile(headers, 99) if headers else None,
        "header_max_s": max(headers) if headers else None,
        # Calls served at the first try, apart from those that met a 401 and changed
        # token: what a cut elsewhere could slow down, and nothing else should.
        "first_try_p99_s": _percentile(plain, 99) if plain else None,
        "after_401_max_s": max(retried) if retried else None,
    }
