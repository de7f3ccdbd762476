"""Single flight across processes on a loaded machine (``--only stress``).

8 processes × 250 coroutines ask for a cold key at once, over file:// and redis://,
while a CPU hog keeps every core busy (2 spinning processes per core), 20 rounds each.
The one-request promise must hold in every round: load is not a backend fault.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cl_tokens.testing import FakeAuthServer

from ._common import Config, redis_available
from .stampede import _one_cross_process_round

__all__ = ["stress"]


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


@contextmanager
def cpu_hog(per_core: int = 2, seconds: float = 3600.0) -> Iterator[int]:
    """``per_core`` busy processes per core until the block ends; yields their number."""
    context = multiprocessing.get_context("spawn")
    hogs = [
        context.Process(target=_spin, args=(time.time() + seconds,), daemon=True)
        for _ in range(per_core * (os.cpu_count() or 1))
    ]
    for hog in hogs:
        hog.start()
    try:
        yield len(hogs)
    finally:
        for hog in hogs:
            hog.terminate()
        for hog in hogs:
            hog.join(5)


async def stress(cfg: Config) -> dict[str, Any]:
    rounds = 4 if cfg.quick else 20
    load = dataclasses.replace(cfg, processes=8, callers_per_process=250)
    results: dict[str, Any] = {"processes": 8, "callers": 250, "rounds": rounds}
    backends = ["file"]
    why = await redis_available(cfg.redis_url)
    if why is None:
        backends.append("redis")
    else:
        results["skipped"] = {"redis": why}
    async with FakeAuthServer(latency=cfg.stampede_latency) as server:
        with cpu_hog() as hogs:
            results["cpu_hogs"] = hogs
            for backend in backends:
                directory = tempfile.mkdtemp(prefix="cl-tokens-bench-stress-")
                counts = []
                warnings: list[str] = []
                try:
                    for _ in range(rounds):
                        one = await _one_cross_process_round(load, server, backend, directory)
                        counts.append(one["token_requests"])
                        warnings += one["warnings"]
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                results[backend] = {
                    "token_requests": counts,
                    "rounds_with_one_request": sum(1 for c in counts if c == 1),
                    "warnings": warnings[:10],
                    "load_average": os.getloadavg()[0],
                }
    return results
