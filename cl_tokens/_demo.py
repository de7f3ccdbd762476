"""``cl-tokens demo``: many concurrent callers, one token request, offline.

The demo starts a ``FakeAuthServer`` in this process (answering after a set latency)
and sends a burst of concurrent ``header()`` calls at it, twice: the first burst finds
no token (every caller waits for the one request), the second finds it cached. With
``--processes N`` the callers are split over N worker processes (``cl-tokens
_demo-worker``), each with its own TokenManager on one shared backend; they start the
burst together, when every worker has said it is ready.

Configuration: ``--scope``, ``--backend`` and the environment's ``CL_SCOPE``,
``CL_TOKEN_BACKEND``, ``CL_TOKEN_ENCRYPTION_KEY``, ``CL_BODY_ENCODING`` and tuning
variables are honoured (and checked: ``CL_ATTEMPTS=abc`` is an error). The demo brings
its own endpoint and credentials, so ``--client-id``, ``--client-secret-stdin`` and
``--auth-url`` are refused, and ``CL_CLIENT_ID``, ``CL_CLIENT_SECRET`` and ``CL_AUTH_URL``
are not read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ._errors import ConfigurationError
from ._manager import TokenManager
from ._settings import Settings, Sources, env_sources, settings_from_sources
from .backends._base import redact_url

__all__ = [
    "DEMO_EPILOG",
    "MAX_CALLERS",
    "MAX_PROCESSES",
    "add_demo_arguments",
    "add_worker_arguments",
    "demo_settings",
    "run_demo",
    "run_worker",
]

# The in-process fake server's credentials: they open nothing anywhere else.
DEMO_CLIENT_ID = "cl-tokens-demo"
DEMO_CLIENT_SECRET = "cl-tokens-demo-secret"  # noqa: S105 - only the demo's own server takes it
# Bounds: 64 processes and 100,000 callers make the point in seconds; more only waits.
MAX_PROCESSES = 64
MAX_CALLERS = 100_000
# Where the demo's manager settings may come from: everything but the credential and
# its endpoint, which the demo brings (a placeholder here; the server's URL later).
_NOT_READ = ("client_id", "client_secret", "auth_url")
_PLACEHOLDER_URL = "http://127.0.0.1:1/oauth/token"
_READY = b"ready"
_WORKER_START_TIMEOUT = 60.0
# A worker's result is one JSON line holding every latency: far above asyncio's 64 KiB.
_LINE_LIMIT = 1 << 30


class DemoError(RuntimeError):
    """The demo could not run (a worker process failed)."""


def _whole_number(text: str, most: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    if value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most:,}, not {value:,}")
    return value


def _callers(text: str) -> int:
    return _whole_number(text, MAX_CALLERS)


def _processes(text: str) -> int:
    return _whole_number(text, MAX_PROCESSES)


def _latency(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be milliseconds, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more milliseconds, not {text!r}")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cl-tokens demo`` (``--backend`` comes with the common options).

    Args:
        parser: the demo subcommand's parser.
    """
    parser.add_argument(
        "--callers",
        type=_callers,
        default=10_000,
        help=f"concurrent callers (10000, at most {MAX_CALLERS})",
    )
    parser.add_argument(
        "--processes",
        type=_processes,
        default=None,
        help=f"split the callers over N (at most {MAX_PROCESSES}) worker processes sharing "
        "--backend (default backend then: a temporary file:// directory)",
    )
    parser.add_argument(
        "--latency-ms",
        type=_latency,
        default=50.0,
        help="how long the fake token endpoint takes to answer (50)",
    )


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the internal ``_demo-worker`` command.

    Args:
        parser: the worker subcommand's parser.
    """
    parser.add_argument("--callers", type=_callers, required=True)


DEMO_EPILOG = """\
configuration: --scope and --backend, or the environment's CL_SCOPE, CL_TOKEN_BACKEND,
  CL_TOKEN_ENCRYPTION_KEY, CL_BODY_ENCODING and tuning variables (CL_ATTEMPTS, ...).
  The demo runs its own local token endpoint with its own credentials: it does not read
  CL_CLIENT_ID, CL_CLIENT_SECRET or CL_AUTH_URL, and refuses --client-id,
  --client-secret-stdin and --auth-url.
default backend: memory://; with --processes, a temporary file:// directory.
"""


def demo_settings(args: argparse.Namespace, auth_url: str = _PLACEHOLDER_URL) -> Settings:
    """The settings of the demo's managers: the environment and flags but credentials.

    Args:
        args: the parsed command line (optional ``scope``, ``backend``).
        auth_url: the token endpoint (the demo's own server).

    Raises:
        ConfigurationError: a bad setting, named by its variable or flag.
    """
    sources: Sources = {
        name: value for name, value in env_sources(None).items() if name not in _NOT_READ
    }
    for name in ("scope", "backend"):
        value = getattr(args, name, None)
        if value is not None:
            sources[name] = (value, f"--{name}")
    sources["client_id"] = (DEMO_CLIENT_ID, "the demo's client id")
    sources["client_secret"] = (DEMO_CLIENT_SECRET, "the demo's client secret")
    sources["auth_url"] = (auth_url, "the demo's endpoint")
    return settings_from_sources(sources)


def _backend_label(args: argparse.Namespace) -> str:
    if getattr(args, "backend", None) is not None:
        return "--backend"
    return "CL_TOKEN_BACKEND"


def _backend_given(args: argparse.Namespace) -> bool:
    return getattr(args, "backend", None) is not None or bool(
        env_sources(None).get("backend", (None, ""))[0]
    )


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Burst:
    """The latencies (seconds) of one burst's callers, filled in as they are served."""

    latencies: list[float] = field(default_factory=list)


async def burst(manager: TokenManager, callers: int, into: Burst) -> None:
    """Run ``callers`` concurrent ``header()`` calls, recording each one's latency.

    Args:
        manager: the manager to call.
        callers: how many calls.
        into: where the latencies go, as each call returns (so progress can be shown).
    """

    async def call() -> None:
        start = time.perf_counter()
        await manager.header()
        into.latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(call() for _ in range(callers)))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of already sorted values.

    Args:
        sorted_values: ascending, non-empty.
        p: 0 to 100.
    """
    rank = max(math.ceil(p / 100 * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def latency_line(latencies: Sequence[float]) -> str:
    """``p50 … p90 … p99 … max …`` for a burst's latencies.

    Args:
        latencies: seconds, in any order.
    """
    if not latencies:
        return "-"
    ordered = sorted(latencies)
    marks = (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    cells = [f"{name} {_duration(percentile(ordered, p))}" for name, p in marks]
    return "   ".join(cell.ljust(12) for cell in cells).rstrip()


class Progress:
    """One status line rewritten in place with ``\\r``, only on a terminal.

    Args:
        stream: where to write (a pipe or file gets nothing).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        if self._enabled:
            self._width = max(self._width, len(text))
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()

    def clear(self) -> None:
        if self._enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0

    @contextlib.asynccontextmanager
    async def ticking(self, status: Callable[[], str]) -> AsyncIterator[None]:
        """Show ``status()`` every 0.1 s while the block runs.

        Args:
            status: the current status line.
        """
        if not self._enabled:
            yield
            return

        async def tick() -> None:
            while True:
                self.show(status())
                await asyncio.sleep(0.1)

        task = asyncio.create_task(tick())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.clear()


# -- the demo --------------------------------------------------------------------------------


@dataclass
class _Outcome:
    cold: list[float]
    warm: list[float]


async def run_demo(args: argparse.Namespace) -> int:
    """``cl-tokens demo``: print the burst's summary; 0 when every caller was served.

    Args:
        args: the parsed command line (``callers``, ``processes``, ``latency_ms``,
            optional ``backend``).

    Raises:
        ConfigurationError: a bad ``--backend`` (or memory:// with ``--processes``).
        DemoError: a worker process failed.
    """
    from .testing import FakeAuthServer

    callers: int = args.callers
    processes: int | None = args.processes
    settings = demo_settings(args)  # every problem before anything starts
    shared = _backend_given(args)
    if shared and processes is not None and settings.backend.strip().lower().startswith("memory:"):
        raise ConfigurationError(
            f"{_backend_label(args)} memory:// is private to each process; with --processes "
            "use a shared backend such as file:///tmp/cl-tokens-demo or redis://localhost:6379/0"
        )
    out = sys.stdout
    with contextlib.ExitStack() as stack:
        if not shared and processes is not None:
            # Worker processes need a backend they share; a temporary directory will do.
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="cl-tokens-demo-"))
            settings = dataclasses.replace(settings, backend=Path(directory).as_uri())
        backend = settings.backend
        async with FakeAuthServer(
            client_id=DEMO_CLIENT_ID,
            client_secret=DEMO_CLIENT_SECRET,
            latency=args.latency_ms / 1000,
        ) as server:
            settings = dataclasses.replace(settings, auth_url=server.url)
            progress = Progress(out)
            if processes is None:
                outcome = await _in_process(settings, callers, progress)
            else:
                outcome = await _in_processes(settings, callers, processes, progress)
            token_requests = server.token_requests
    where = "1 process" if processes is None else f"{processes} worker processes"
    out.write(
        f"cl-tokens demo: {callers:,} concurrent header() calls in {where}, backend "
        f"{redact_url(backend)},\nagainst a local fake token endpoint that answers in "
        f"{args.latency_ms:g} ms.\n\n"
        f"  callers served   {len(outcome.cold):,} of {callers:,}\n"
        f"  token requests   {token_requests}\n"
        f"  cold burst       {latency_line(outcome.cold)}\n"
        f"  warm burst       {latency_line(outcome.warm)}\n\n"
        + (
            "cold: no token yet, so every caller waits for the same single request;\n"
            if token_requests == 1
            else f"cold: {token_requests} token requests where one was expected: the callers "
            f"did not share a token\n      through {redact_url(backend)} (see the warnings "
            "on stderr);\n"
        )
        + "warm: the same burst again, served from the cache.\n"
    )
    out.flush()
    return 0 if len(outcome.cold) == callers else 1


async def _in_process(settings: Settings, callers: int, progress: Progress) -> _Outcome:
    cold, warm = Burst(), Burst()
    async with TokenManager.from_settings(settings) as manager:
        with_status = progress.ticking(lambda: f"  served {len(cold.latencies):,} of {callers:,}")
        async with with_status:
            await burst(manager, callers, cold)
        await burst(manager, callers, warm)
    return _Outcome(cold.latencies, warm.latencies)


async def _in_processes(
    settings: Settings, callers: int, processes: int, progress: Progress
) -> _Outcome:
    shares = [callers // processes + (i < callers % processes) for i in range(processes)]
    workers: list[_Worker] = []

    def status() -> str:
        ready = sum(worker.ready for worker in workers)
        served = sum(worker.served for worker in workers)
        return f"  workers ready {ready} of {processes}, served {served:,} of {callers:,}"

    try:
        async with progress.ticking(status):
            for index, share in enumerate(shares):
                workers.append(await _Worker.spawn(index, settings, share))
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(worker.wait_ready() for worker in workers)),
                    _WORKER_START_TIMEOUT,
                )
            except asyncio.TimeoutError:
                raise DemoError(
                    f"the demo workers did not start within {_WORKER_START_TIMEOUT:g} s"
                ) from None
            # Every worker is ready: start the burst in all of them at once. Waiting
            # asynchronously keeps this loop serving the fake token endpoint.
            results = await asyncio.gather(*(worker.run() for worker in workers))
    finally:
        for worker in workers:
            await worker.stop()
    return _Outcome(
        [x for result in results for x in result["cold"]],
        [x for result in results for x in result["warm"]],
    )


class _Worker:
    """One ``_demo-worker`` process, talked to in JSON lines over its stdin and stdout."""

    # Lines already passed on to the demo's stderr, by any worker: a warning every worker
    # logs (the shared backend failed) is shown once.
    _forwarded: set[str] = set()  # noqa: RUF012 - deliberately shared by the workers

    def __init__(self, index: int, process: asyncio.subprocess.Process) -> None:
        self.index = index
        self.process = process
        self.ready = False
        self.served = 0
        self._errors: list[str] = []
        self._stderr = asyncio.get_running_loop().create_task(self._forward_stderr())

    @classmethod
    async def spawn(cls, index: int, settings: Settings, callers: int) -> _Worker:
        scope = ["--scope", settings.scope] if settings.scope else []
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cl_tokens",
            "_demo-worker",
            "--auth-url",
            settings.auth_url,
            "--backend",
            settings.backend,
            *scope,
            "--callers",
            str(callers),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        return cls(index, process)

    async def _forward_stderr(self) -> None:
        """Pass the worker's warnings on to stderr (each once); keep its error line."""
        stream = self.process.stderr
        if stream is None:
            return
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            if line.startswith("cl-tokens: WARNING:"):
                if line not in _Worker._forwarded:
                    _Worker._forwarded.add(line)
                    print(line, file=sys.stderr, flush=True)
            else:
                self._errors.append(line)

    async def wait_ready(self) -> None:
        if self.process.stdout is None:
            raise DemoError(f"demo worker {self.index + 1} has no stdout")
        line = await self.process.stdout.readline()
        if line.strip() != _READY:
            self.process.kill()
            raise DemoError(f"demo worker {self.index + 1} did not start ({await self._error()})")
        self.ready = True

    async def run(self) -> dict[str, list[float]]:
        """Say go; follow its progress lines; return its latencies."""
        process = self.process
        if process.stdin is None or process.stdout is None:
            raise DemoError(f"demo worker {self.index + 1} has no stdin or stdout")
        try:
            process.stdin.write(b"go\n")
            await process.stdin.drain()
            process.stdin.close()
        # A worker that died has no stdin to write to; its own error says why. (A
        # BrokenPipeError here must not pass for the demo's stdout being closed.)
        except (BrokenPipeError, ConnectionResetError):
            raise DemoError(
                f"demo worker {self.index + 1} exited early ({await self._error()})"
            ) from None
        result: dict[str, list[float]] | None = None
        async for line in process.stdout:
            message = json.loads(line)
            if "served" in message:
                self.served = message["served"]
            else:
                result = message
        if await process.wait() != 0 or result is None:
            raise DemoError(f"demo worker {self.index + 1} failed ({await self._error()})")
        self.served = len(result["cold"])
        return result

    async def _error(self) -> str:
        await self.process.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._stderr), 5)
        return self._errors[-1] if self._errors else f"exit code {self.process.returncode}"

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stderr, 5)


# -- a worker process --------------------------------------------------------------------------


async def run_worker(args: argparse.Namespace) -> int:
    """``cl-tokens _demo-worker``: say ready, wait for "go", run both bursts, report.

    It writes JSON lines to stdout: ``{"served": n}`` while the cold burst runs, then
    ``{"cold": [...], "warm": [...]}`` with every latency in seconds.

    Args:
        args: the parsed command line (``auth_url``, ``backend``, ``callers``).
    """
    auth_url, backend = getattr(args, "auth_url", None), getattr(args, "backend", None)
    if not auth_url or not backend:
        raise ConfigurationError("_demo-worker needs --auth-url and --backend")
    settings = demo_settings(args, auth_url)
    cold, warm = Burst(), Burst()

    async def report() -> None:
        while True:
            await asyncio.sleep(0.1)
            print(json.dumps({"served": len(cold.latencies)}), flush=True)

    async with TokenManager.from_settings(settings) as manager:
        print(_READY.decode(), flush=True)
        if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
            return 1  # the demo went away before the burst
        reporter = asyncio.create_task(report())
        try:
            await burst(manager, args.callers, cold)
        finally:
            reporter.cancel()
        await burst(manager, args.callers, warm)
    print(json.dumps({"cold": cold.latencies, "warm": warm.latencies}), flush=True)
    return 0
