"""One process of the cross-process stampede (started by ``benchmarks.stampede``).

Protocol: build the backend and the manager (and connect to Redis), print ``READY``,
read a wall-clock start time from stdin, wait for it, start ``--callers`` coroutines
calling ``header()`` at once, print ``RESULT <json>`` with when each was served and
when (if ever) this process wrote the token to the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import sys
import time
from typing import Any

from cl_tokens import Token, TokenManager
from cl_tokens.backends import FileBackend, RedisBackend, TokenBackend


def _timed(base: type[TokenBackend]) -> Any:
    """``base`` that notes when this process first had the token: ``written_at`` when
    its ``set()`` returned (the winner), ``seen_at`` when a ``get()`` first returned a
    token (everyone else). With ``trace`` set, every backend call is recorded as
    (start, end, method, outcome) for diagnosis."""

    class Timed(base):  # type: ignore[valid-type,misc]
        written_at: float | None = None
        seen_at: float | None = None
        trace: list[tuple[float, float, str, str]] | None = None

        async def set(self, key: str, token: Token) -> None:
            start = time.time()
            await super().set(key, token)
            self.written_at = time.time()
            self._record(start, "set", "ok")

        async def get(self, key: str) -> Token | None:
            start = time.time()
            token: Token | None = await super().get(key)
            if token is not None and self.seen_at is None:
                self.seen_at = time.time()
            self._record(start, "get", "hit" if token is not None else "miss")
            return token

        # The cold path's own calls: a backend that overrides them (Redis: one script
        # each; a push wake-up) never goes through get() or set().
        async def get_or_lock(self, key: str, *, lease: float, refuse: str | None = None) -> Any:
            start = time.time()
            outcome = await super().get_or_lock(key, lease=lease, refuse=refuse)
            self._saw(outcome)
            kind = "hit" if isinstance(outcome, Token) else "taken" if outcome else "busy"
            self._record(start, "get_or_lock", kind)
            return outcome

        async def set_and_release(self, key: str, token: Token, handle: Any) -> None:
            start = time.time()
            await super().set_and_release(key, token, handle)
            if self.written_at is None:  # the default composition has set() note it
                self.written_at = time.time()
            self._record(start, "set_and_release", "ok")

        async def wait_for(self, key: str, **options: Any) -> Token | None:
            start = time.time()
            token: Token | None = await super().wait_for(key, **options)
            self._saw(token)
            self._record(start, "wait_for", "hit" if token is not None else "none")
            return token

        def _saw(self, outcome: object) -> None:
            if isinstance(outcome, Token) and self.seen_at is None:
                self.seen_at = time.time()

        async def acquire_lock(self, key: str, *, lease: float) -> Any:
            start = time.time()
            handle = await super().acquire_lock(key, lease=lease)
            self._record(start, "lock", "taken" if handle is not None else "busy")
            return handle

        async def release_lock(self, handle: Any) -> None:
            start = time.time()
            await super().release_lock(handle)
            self._record(start, "release", "ok")

        def _record(self, start: float, method: str, outcome: str) -> None:
            if self.trace is not None:
                self.trace.append((start, time.time(), method, outcome))

    return Timed


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("--auth-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", default="")
    parser.add_argument("--scope", required=True)
    parser.add_argument("--backend", choices=("file", "redis"), required=True)
    parser.add_argument("--target", required=True, help="directory or Redis URL")
    parser.add_argument("--callers", type=int, default=500)
    parser.add_argument("--trace", action="store_true", help="report every backend call")
    args = parser.parse_args(argv)

    backend: Any
    if args.backend == "file":
        backend = _timed(FileBackend)(args.target)
    else:
        backend = _timed(RedisBackend)(url=args.target)
        await backend.client.ping()  # connect now, not in the timed part
    if args.trace:
        backend.trace = []
        gc_marks: dict[str, float] = {}

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_marks["start"] = time.time()
            elif info["generation"] >= 1:
                backend.trace.append(
                    (gc_marks["start"], time.time(), f"gc{info['generation']}", "")
                )

        gc.callbacks.append(on_gc)
    manager = TokenManager(
        args.client_id,
        args.client_secret or None,
        scope=args.scope,
        auth_url=args.auth_url,
        backend=backend,
    )
    # A fresh interpreter owes a first full collection of everything its imports made;
    # paid here, as a server has long paid it before traffic comes. Left to chance, it
    # lands on the burst of waking 500 callers: 16 processes each collecting their whole
    # heap at once, on 2 cores, which is a benchmark artefact, not the library's cost.
    gc.collect()
    print("READY", flush=True)
    go = float(sys.stdin.readline())
    await asyncio.sleep(max(0.0, go - time.time()))

    async def caller() -> tuple[float, str]:
        header = await manager.header()
        return time.time(), header["Authorization"]

    started_at = time.time()
    done = await asyncio.gather(*(caller() for _ in range(args.callers)))
    headers = {h for _, h in done}
    await manager.aclose()
    await backend.aclose()
    result = {
        "pid": os.getpid(),
        "started_at": started_at,
        "served_at": [t for t, _ in done],
        "written_at": backend.written_at,
        "seen_at": backend.seen_at,
        "distinct_headers": len(headers),
        "token_digest": hashlib.sha256("".join(sorted(headers)).encode()).hexdigest()[:16],
        "trace": backend.trace,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
