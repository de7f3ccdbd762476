"""One worker process of the multi-host benchmark (started by ``benchmarks.hosts``
inside a host's network namespace).

It builds a TokenManager on the shared Redis, connects, prints ``READY``, then runs
the commands it reads from stdin, one JSON object a line, answering each with a line
``RESULT <json>``:

- ``{"op": "burst", "at": t, "scope": s}``: at wall time ``t`` every caller calls
  ``header(s)`` once, all at once (a cold cache when ``s`` is new).
- ``{"op": "api", "at": t, "timeout": s}``: at ``t`` every caller gets the header and
  calls the fake Commerce Layer API with it; on a 401 it invalidates exactly the token
  it sent, gets the header again and calls the API again (what the library's HTTP
  integrations do). Each API request may take ``s`` seconds.
- ``{"op": "load", "at": t, "until": u, "callers": n, "pace": p, "timeout": s}``: ``n``
  callers repeat that API call every ``p`` seconds from ``t`` to ``u``, each recorded.
- ``{"op": "quit"}``.

Every answer carries the token requests this process sent (counted by an aiohttp trace
on the manager's session), and digests of the tokens served, never the tokens.

The library takes a plain-http token URL only to a loopback host (a safeguard for real
deployments), but the fake token server is on the bridge, outside this namespace. So the
manager is given ``http://localhost:<port>/oauth/token`` and a session whose resolver
sends ``localhost`` to the bridge address (``--token-host``): the requests cross the
namespace's link, as a real host's would, and a cut link cuts them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import socket
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from cl_tokens import TokenManager
from cl_tokens.backends import RedisBackend


def digest(authorization: str) -> str:
    return hashlib.sha256(authorization.encode()).hexdigest()[:12]


class _ToBridge(AbstractResolver):
    """Resolves every name to one address: the token server's on the bridge."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": self.address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        pass


class _WarningCounter(logging.Handler):
    """Counts the library's warnings by their format string (never the formatted
    message, which may name a URL), so each answer says what went wrong meanwhile."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[str(record.msg)] += 1


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.token_requests = 0
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._on_request)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=_ToBridge(args.token_host)),
            trace_configs=[trace],
        )
        self.api = aiohttp.ClientSession()
        self.backend = RedisBackend(url=args.redis_url)
        self.manager = TokenManager(
            args.client_id,
            args.client_secret or None,
            scope=args.scope,
            auth_url=args.auth_url,
            backend=self.backend,
            session=self.session,
        )

    async def _on_request(self, session: Any, context: Any, params: Any) -> None:
        if str(params.url).endswith("/oauth/token"):
            self.token_requests += 1

    async def aclose(self) -> None:
        await self.manager.aclose()
        await self.backend.aclose()
        await self.session.close()
        await self.api.close()

    async def api_call(self, timeout: float) -> tuple[float, float, str, str]:
        """One call as an application makes it, each API request given ``timeout``
        seconds: (header() seconds, total seconds, outcome, digest of the last header
        sent). Outcomes: ``ok``, ``ok-after-401``,
        ``header-failed:<error>``, ``api-failed:<error>``, ``401-twice``."""
        start = time.perf_counter()
        header_s = 0.0
        served = ""
        for attempt in range(2):
            began = time.perf_counter()
            try:
                header = await self.manager.header()
            except Exception as exc:
                return header_s, time.perf_counter() - start, f"header-failed:{_kind(exc)}", ""
            header_s += time.perf_counter() - began
            served = digest(header["Authorization"])
            try:
                async with self.api.get(
                    self.args.api_url, headers=header, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as response:
                    await response.read()
                    status = response.status
            except Exception as exc:
                return header_s, time.perf_counter() - start, f"api-failed:{_kind(exc)}", served
            if status != 401:
                outcome = "ok" if attempt == 0 else "ok-after-401"
                return header_s, time.perf_counter() - start, outcome, served
            await self.manager.invalidate(header["Authorization"].split(" ", 1)[1])
        return header_s, time.perf_counter() - start, "401-twice", served

    async def burst(self, at: float, scope: str) -> dict[str, Any]:
        await _until(at)

        async def caller() -> tuple[float, str]:
            began = time.perf_counter()
            try:
                header = await self.manager.header(scope)
            except Exception as exc:
                return time.perf_counter() - began, f"failed:{_kind(exc)}"
            return time.perf_counter() - began, digest(header["Authorization"])

        done = await asyncio.gather(*(caller() for _ in range(self.args.callers)))
        return {
            "latencies": [s for s, _ in done],
            "digests": dict(Counter(d for _, d in done if not d.startswith("failed:"))),
            "failures": dict(Counter(d for _, d in done if d.startswith("failed:"))),
        }

    async def api_round(self, at: float, timeout: float) -> dict[str, Any]:
        await _until(at)
        done = await asyncio.gather(*(self.api_call(timeout) for _ in range(self.args.callers)))
        return {
            "latencies": [total for _, total, _, _ in done],
            "header_latencies": [header_s for header_s, _, _, _ in done],
            "outcomes": dict(Counter(outcome for _, _, outcome, _ in done)),
            "digests": dict(Counter(digest for _, _, outcome, digest in done if "ok" in outcome)),
        }

    async def load(
        self, at: float, until: float, callers: int, pace: float, timeout: float
    ) -> dict[str, Any]:
        await _until(at)
        calls: list[tuple[float, float, float, str, str]] = []

        async def caller(offset: float) -> None:
            await asyncio.sleep(offset)  # spread the callers over one pace
            while time.time() < until:
                began = time.time()
                header_s, total_s, outcome, served = await self.api_call(timeout)
                calls.append((began, header_s, total_s, outcome, served))
                await asyncio.sleep(max(0.0, pace - (time.time() - began)))

        await asyncio.gather(*(caller(pace * i / callers) for i in range(callers)))
        return {"calls": calls}


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


async def _until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.time()))


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_worker")
    parser.add_argument("--auth-url", required=True)
    parser.add_argument("--token-host", required=True, help="the bridge address")
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", default="")
    parser.add_argument("--scope", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--callers", type=int, default=50)
    args = parser.parse_args(argv)
    worker = Worker(args)
    warnings = _WarningCounter()
    logging.getLogger("cl_tokens").addHandler(warnings)
    await worker.backend.client.ping()  # connect now, not in the measured part
    print("READY", flush=True)
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            op = command["op"]
            before = worker.token_requests
            warnings.counts.clear()
            if op == "quit":
                break
            if op == "burst":
                result = await worker.burst(command["at"], command["scope"])
            elif op == "api":
                result = await worker.api_round(command["at"], command["timeout"])
            elif op == "load":
                result = await worker.load(
                    command["at"],
                    command["until"],
                    command["callers"],
                    command["pace"],
                    command["timeout"],
                )
            else:
                raise ValueError(f"unknown op {op!r}")
            result["token_requests"] = worker.token_requests - before
            result["warnings"] = dict(warnings.counts)
            print("RESULT " + json.dumps(result), flush=True)
    finally:
        await worker.aclose()


if __name__ == "__main__":
    asyncio.run(main())
