"""Running ``cl-tokens`` as a user would: a subprocess, its own environment, a tmp cache.

The tests' FakeAuthServer runs on the test's event loop, so the CLI runs under
``asyncio.create_subprocess_exec``: a blocking ``subprocess.run`` would stall the server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SECRET = "test-client-secret"  # the one tests/conftest.py gives the server


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float


async def cl_tokens(
    *args: str,
    env: dict[str, str],
    stdin: str | None = None,
    timeout: float = 60,
    close_stdin: bool = False,
    stdout: int = asyncio.subprocess.PIPE,
) -> Run:
    """Run ``python -m cl_tokens *args`` without blocking the loop the server runs on.

    ``close_stdin`` starts it with no stdin at all (like ``<&-`` in a shell); ``stdout``
    may be a file descriptor to write to instead of a pipe read here.
    """
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cl_tokens",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        preexec_fn=(lambda: os.close(0)) if close_stdin else None,
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin is not None else None), timeout
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Run(process.returncode, (out or b"").decode(), err.decode(), time.monotonic() - started)


async def cl_tokens_into_closed_pipe(*args: str, env: dict[str, str]) -> Run:
    """Run ``cl-tokens *args`` with stdout a pipe whose reader is gone (``| true``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return await cl_tokens(*args, env=env, stdout=write_end)
    finally:
        os.close(write_end)


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any CL_ or XDG_CACHE_HOME variable, plus
    ``values``. Give the CLI a cache of its own (``XDG_CACHE_HOME``) where it may cache:
    its default backend is a per-user directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CL_") and k != "XDG_CACHE_HOME"}
    env.update(values)
    return env


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/oauth/token"


def stored_tokens(directory: Path) -> list[Path]:
    """The token files a file:// backend wrote in ``directory``."""
    return list(directory.glob("*.json"))


def exists(path: Path) -> bool:
    return path.exists()


def assert_one_error_line(run: Run) -> str:
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("cl-tokens: error: ")
    assert "Traceback" not in run.stderr
    return lines[0]


def assert_warnings_then_one_error_line(run: Run) -> tuple[list[str], str]:
    """The warning lines and the error line of a failed run: warnings first, one each."""
    *warnings, error = run.stderr.splitlines()
    assert error.startswith("cl-tokens: error: "), run.stderr
    for line in warnings:
        assert line.startswith("cl-tokens: WARNING: cl_tokens: "), run.stderr
    assert len(set(warnings)) == len(warnings), run.stderr
    assert "Traceback" not in run.stderr
    return warnings, error
