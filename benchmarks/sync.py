"""The synchronous warm path: ``SyncTokenManager.header()`` next to a plain function.

The floor is the least a sync header getter can do: ``def floor(): return
{"Authorization": d[key]}`` (one dict lookup, one new dict). Both are timed in the same
loop shape (``for _ in range(n): fn()``), in alternating slices of one round, as the
async hot path is (see ``_common.paired_round``). The manager's own event loop keeps
running in its daemon thread meanwhile, as it does in an application.

It runs in a worker thread (``asyncio.to_thread``), so the fake token server, on the
benchmark's event loop, can answer the manager's one cold request.
"""

from __future__ import annotations

import gc
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from cl_tokens import SyncTokenManager
from cl_tokens.testing import FakeAuthServer

from ._common import CHUNK, Config, Paired, median

__all__ = ["sync_hot_path"]

SyncLoop = Callable[[int], None]


def make_floor(value: str) -> Callable[[], dict[str, str]]:
    """The floor: a dict lookup and a new dict, in a plain function."""
    # Keyed by None like the manager's hot tier is for a call without a scope.
    d: dict[str | None, str] = {None: value}
    key = None

    def floor() -> dict[str, str]:
        return {"Authorization": d[key]}

    return floor


def loop_of(fn: Callable[[], Any]) -> SyncLoop:
    """A loop making ``n`` calls ``fn()``: the shape every subject is timed in."""

    def loop(n: int) -> None:
        for _ in range(n):
            fn()

    return loop


def paired_round(
    floor: SyncLoop, subject: SyncLoop, calls: int, *, first: str
) -> tuple[float, float, float]:
    """One round, as ``_common.paired_round`` but synchronous: slices of ``CHUNK`` calls,
    floor and subject taking turns; the round's ratio is the median over slices of
    (subject ns / neighbouring floor ns). Cyclic GC off during the round."""
    slices = max(1, calls // CHUNK)
    per_slice = max(1, calls // slices)
    f_slices: list[int] = []
    s_slices: list[int] = []
    gc.collect()
    gc.disable()
    try:
        for i in range(slices):
            floor_first = (i % 2 == 0) == (first == "floor")
            for side in ("floor", "subject") if floor_first else ("subject", "floor"):
                start = time.perf_counter_ns()
                if side == "floor":
                    floor(per_slice)
                    f_slices.append(time.perf_counter_ns() - start)
                else:
                    subject(per_slice)
                    s_slices.append(time.perf_counter_ns() - start)
    finally:
        gc.enable()
    ratio = median([s / f for f, s in zip(f_slices, s_slices, strict=True)])
    total = per_slice * slices
    return sum(f_slices) / total, sum(s_slices) / total, ratio


class _CountingSubmit:
    """Counts the calls that went to the manager's event loop (none when warm)."""

    def __init__(self, manager: SyncTokenManager) -> None:
        self.calls = 0
        state = manager._state
        original = state.submit

        def submit(*args: Any) -> Any:
            self.calls += 1
            return original(*args)

        state.submit = submit  # type: ignore[method-assign, assignment]


def sync_hot_path(cfg: Config, server: FakeAuthServer) -> dict[str, Any]:
    """ns per warm ``SyncTokenManager.header()`` for the memory and file backends, next
    to the plain-function floor; and the calls that left the calling thread meanwhile."""
    directory = tempfile.mkdtemp(prefix="cl-tokens-bench-sync-")
    backends: dict[str, str | None] = {"memory": None, "file": f"file://{directory}"}
    managers: dict[str, SyncTokenManager] = {}
    counters: dict[str, _CountingSubmit] = {}
    results: dict[str, Any] = {}
    try:
        requests_before = server.token_requests
        for name, backend in backends.items():
            manager = SyncTokenManager(
                server.client_id,
                server.client_secret,
                scope=f"market:code:bench-sync-{secrets.token_hex(6)}",
                auth_url=server.url,
                backend=backend,
            )
            managers[name] = manager
            manager.header()  # cold: starts the loop thread, fetches, writes the backend
            counters[name] = _CountingSubmit(manager)
        warm_requests = server.token_requests - requests_before
        value = managers["memory"].header()["Authorization"]
        floor = loop_of(make_floor(value))
        floor(min(cfg.calls, 20_000))  # warm up
        for name, manager in managers.items():
            subject = loop_of(manager.header)
            subject(min(cfg.calls, 20_000))
            paired = Paired(f"SyncTokenManager.header(), {name} backend", cfg.calls, cfg.calls)
            for round_no in range(cfg.rounds):
                first = "floor" if round_no % 2 == 0 else "subject"
                paired.add(paired_round(floor, subject, cfg.calls, first=first))
            results[name] = paired.as_dict()
        return {
            "backends": results,
            "loop_calls_while_timing": {name: c.calls for name, c in counters.items()},
            "token_requests": warm_requests,
            "token_requests_while_timing": server.token_requests - requests_before - warm_requests,
        }
    finally:
        for manager in managers.values():
            manager.close()
        shutil.rmtree(directory, ignore_errors=True)
