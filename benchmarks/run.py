"""Run every benchmark, print the table, write benchmarks/results/.

    python -m benchmarks            # full run, a few minutes
    python -m benchmarks --quick    # smoke check, under a minute
    python -m benchmarks --only hosts   # opt-in (root): 3 namespace hosts share a Redis

Always exits 0: the table's PASS/FAIL marks are the verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py``: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from cl_tokens import __version__
from cl_tokens.testing import FakeAuthServer

from ._common import DEFAULT_REDIS_URL, Config
from .cold import cold_path
from .customers import customers
from .hosts import hosts
from .hot import hot_path, peers, scale
from .imports import import_time
from .report import rows, write_chart, write_json, write_markdown
from .stampede import cold_stampede, cross_process
from .stress import stress
from .sync import sync_hot_path

BENCHMARKS = (
    "hot",
    "sync",
    "peers",
    "cold",
    "stampede",
    "xproc",
    "scale",
    "stress",
    "customers",
    "import",
)
# Run only when named in --only: they need root (network namespaces).
OPT_IN = ("hosts",)
RESULTS = Path(__file__).resolve().parent / "results"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def run(cfg: Config) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with FakeAuthServer() as server:
        async with _sample_manager(server) as manager:
            sample = (await manager.header())["Authorization"]
        template = sample.split(" ", 1)[1]
        if cfg.wants("hot"):
            _log("hot path: memory, file, redis backends")
            results["hot_path"] = await hot_path(cfg, server)
        if cfg.wants("sync"):
            _log("sync hot path: SyncTokenManager.header(), memory and file backends")
            # In a worker thread: the token server runs on this loop.
            results["sync_hot_path"] = await asyncio.to_thread(sync_hot_path, cfg, server)
        if cfg.wants("peers"):
            _log("peers: authlib, redis GET, aiocache, a hand-written single flight")
            results["peers"] = await peers(cfg, sample)
        if cfg.wants("scale"):
            _log(f"scale: {', '.join(map(str, cfg.scale_sizes))} scopes; memory per token")
            results["scale"] = await scale(cfg, server, template)
    if cfg.wants("cold"):
        _log("cold header() ÷ raw aiohttp POST: memory, file, redis backends")
        results["cold_path"] = await cold_path(cfg)
    if cfg.wants("stampede"):
        _log(f"cold stampede: {cfg.stampede_callers:,} coroutines × {cfg.stampede_rounds} rounds")
        results["cold_stampede"] = await cold_stampede(cfg)
    if cfg.wants("xproc"):
        _log(
            f"cross-process: {cfg.processes} processes × {cfg.callers_per_process} coroutines "
            f"× {cfg.xproc_rounds} rounds, file and redis, next to a bare pub/sub fan-out"
        )
        results["cross_process"] = await cross_process(cfg)
    if cfg.wants("import"):
        _log("import cl_tokens ÷ import aiohttp, fresh interpreters")
        results["import_time"] = await asyncio.to_thread(import_time, cfg)
    if cfg.wants("customers"):
        _log("customers: logins, memory per customer, warm header(customer=...)")
        results["customers"] = await customers(cfg)
    if cfg.wants("stress"):
        _log("stress: 8 processes × 250 coroutines, file and redis, under a CPU hog")
        results["stress"] = await stress(cfg)
    if "hosts" in cfg.only:
        _log("hosts: 3 network-namespace hosts × 4 workers share one Redis (needs root)")
        results["hosts"] = await hosts(cfg)
    return results


def _sample_manager(server: FakeAuthServer) -> Any:
    from cl_tokens import TokenManager

    return TokenManager(server.client_id, server.client_secret, auth_url=server.url)


def _revision() -> str:
    """The commit measured, and whether the library had uncommitted changes (read-only)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "cl_tokens"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    if not head:
        return "unknown"
    return head + (" + uncommitted changes in cl_tokens/" if dirty else "")


def _loadavg() -> float | None:
    """The 1-minute load average: how busy the machine was (other processes included)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="cl_tokens benchmarks: writes results.json, results.md and chart.png.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls, rounds, processes")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of: {', '.join(BENCHMARKS + OPT_IN)} "
        f"(default: all but the opt-in {', '.join(OPT_IN)})",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="Redis to use; only keys the run creates are touched "
        "(default: $CL_TOKENS_BENCH_REDIS_URL or %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="default: %(default)s")
    args = parser.parse_args(argv)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(only) - set(BENCHMARKS + OPT_IN)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    cfg = Config.make(quick=args.quick, redis_url=args.redis_url, only=only)
    started = time.monotonic()
    load_before = _loadavg()
    results = asyncio.run(run(cfg))
    elapsed = time.monotonic() - started
    command = "python -m benchmarks" + (" --quick" if cfg.quick else "")
    if only:
        command += f" --only {','.join(only)}"
    meta = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
        "cl_tokens": __version__,
        "revision": _revision(),
        "quick": cfg.quick,
        "elapsed_s": round(elapsed, 1),
        "loadavg_1m_before_after": [load_before, _loadavg()],
        "config": cfg.as_dict(),
        "gc": "cyclic GC disabled inside each timing loop (gc.collect() just before)",
    }
    kept: list[str] = []
    previous_file = args.out / "results.json"
    if previous_file.exists():
        # A partial run updates its own sections and keeps the others' last figures; a
        # full run keeps the opt-in sections, which it does not run.
        previous = json.loads(previous_file.read_text())
        for name, value in previous.items():
            if name in ("meta", "targets") or name in results:
                continue
            if only or name in OPT_IN:
                results[name] = value
                kept.append(name)
        if kept:
            meta["kept_from_previous_run"] = {
                "sections": kept,
                "previous_meta": previous.get("meta", {}),
            }
    table = rows(results)
    report = {
        "meta": meta,
        "targets": [{**r.__dict__, "result": r.mark} for r in table if r.passed is not None],
        **results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", report)
    text = write_markdown(args.out / "results.md", table, meta)
    charted = write_chart(args.out / "chart.png", results)
    print(text)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}", end="")
    print(f", {args.out / 'chart.png'}" if charted else " (no chart: matplotlib missing)")
    print(f"took {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
