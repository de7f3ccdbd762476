"""``import cl_tokens`` ÷ ``import aiohttp``: what the library adds to its one dependency.

Each import runs in a fresh interpreter with its bytecode cached, as after ``pip install``
(PYTHONDONTWRITEBYTECODE is dropped for the probes: otherwise an editable checkout is
compiled from source on every run while aiohttp's wheel brings its .pyc files, which
made cl_tokens look twice as slow as it is),
timed inside it from just before the ``import`` statement to just after, so interpreter
start-up is left out of both sides. The two statements alternate run by run, so load
from other processes lands on both; figures are medians over the runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from ._common import Config, median

__all__ = ["import_time"]

_PROBE = """
import sys, time
before = len(sys.modules)
start = time.perf_counter()
{statement}
elapsed = time.perf_counter() - start
print(elapsed, len(sys.modules) - before)
"""

STATEMENTS = {"aiohttp": "import aiohttp", "cl_tokens": "import cl_tokens"}


def _probe(statement: str) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(statement=statement)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    return float(out[0]), int(out[1])


def import_time(cfg: Config) -> dict[str, Any]:
    runs = 10 if cfg.quick else 40
    for statement in STATEMENTS.values():  # write any missing bytecode before timing
        _probe(statement)
    seconds: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    modules: dict[str, int] = {}
    order = list(STATEMENTS)
    for i in range(runs):
        for name in order if i % 2 == 0 else order[::-1]:
            elapsed, count = _probe(STATEMENTS[name])
            seconds[name].append(elapsed)
            modules[name] = count
    # Per-run ratios (neighbouring probes) are steadier than a ratio of medians when
    # the load changes during the run; both are kept.
    ratios = [c / a for a, c in zip(seconds["aiohttp"], seconds["cl_tokens"], strict=True)]
    return {
        "runs": runs,
        "statements": STATEMENTS,
        "aiohttp_s_median": median(seconds["aiohttp"]),
        "cl_tokens_s_median": median(seconds["cl_tokens"]),
        "ratio_median": median(ratios),
        "ratio_of_medians": median(seconds["cl_tokens"]) / median(seconds["aiohttp"]),
        "aiohttp_modules": modules["aiohttp"],
        "cl_tokens_modules": modules["cl_tokens"],
        "extra_modules": modules["cl_tokens"] - modules["aiohttp"],
        "aiohttp_s": seconds["aiohttp"],
        "cl_tokens_s": seconds["cl_tokens"],
    }
