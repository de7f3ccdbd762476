"""The CLI caches by default and tells what goes wrong: a user's first trial, as tests.

Each test runs ``cl-tokens`` as a subprocess with ``HOME`` or ``XDG_CACHE_HOME`` pointed
at a temporary directory, against the test's FakeAuthServer.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import stat
import sys
from pathlib import Path

import pytest
from cli_support import (
    SECRET,
    Run,
    assert_one_error_line,
    cl_tokens,
    clean_env,
    stored_tokens,
)

from cl_tokens import _cli
from cl_tokens.testing import FakeAuthServer


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def env(server: FakeAuthServer, home: Path) -> dict[str, str]:
    """A user's configuration: credentials, the endpoint, a home of their own."""
    return clean_env(
        CL_CLIENT_ID=server.client_id,
        CL_CLIENT_SECRET=SECRET,
        CL_AUTH_URL=server.url,
        HOME=str(home),
    )


def warning_lines(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if "WARNING" in line]


# -- the per-user cache --------------------------------------------------------------------


async def test_five_runs_make_one_token_request(
    server: FakeAuthServer, env: dict[str, str], home: Path
) -> None:
    runs = [await cl_tokens("token", env=env) for _ in range(5)]
    assert [run.code for run in runs] == [0] * 5, runs[0].stderr
    assert {run.stdout for run in runs} == {server.issued[0] + "\n"}
    assert server.token_requests == 1
    cache = home / ".cache" / "cl-tokens"
    assert stored_tokens(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert all(run.stderr == "" for run in runs)


async def test_the_cache_follows_xdg_cache_home(
    server: FakeAuthServer, env: dict[str, str], home: Path, tmp_path: Path
) -> None:
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    for _ in range(2):
        assert (await cl_tokens("header", env=env)).code == 0
    assert server.token_requests == 1
    assert stat.S_IMODE((tmp_path / "xdg" / "cl-tokens").stat().st_mode) == 0o700
    assert not (home / ".cache").exists()


async def test_the_environment_and_the_flag_still_choose_the_backend(
    server: FakeAuthServer, env: dict[str, str], home: Path, tmp_path: Path
) -> None:
    env["CL_TOKEN_BACKEND"] = "memory://"
    for _ in range(2):
        assert (await cl_tokens("token", env=env)).code == 0
    assert server.token_requests == 2
    elsewhere = tmp_path / "elsewhere"
    assert (await cl_tokens("token", "--backend", elsewhere.as_uri(), env=env)).code == 0
    assert stored_tokens(elsewhere)
    assert not (home / ".cache").exists()


def test_default_cache_url() -> None:
    assert _cli.default_cache_url({"XDG_CACHE_HOME": "/x/cache", "HOME": "/h"}) == (
        "file:///x/cache/cl-tokens"
    )
    assert _cli.default_cache_url({"HOME": "/h"}) == "file:///h/.cache/cl-tokens"
    # A relative XDG_CACHE_HOME is invalid (XDG base directory spec): ignored.
    assert _cli.default_cache_url({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == (
        "file:///h/.cache/cl-tokens"
    )
    assert _cli.default_cache_url({"HOME": "/"}) is None  # no home: memory:// stays


# -- warnings without flags ------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["redis://127.0.0.1:1/0", "file:///proc/no-such-dir"], ids=["redis", "file"]
)
async def test_a_failing_backend_gives_one_warning_line(
    server: FakeAuthServer, env: dict[str, str], backend: str
) -> None:
    env.update(CL_TOKEN_BACKEND=backend, CL_BACKEND_TIMEOUT="2")
    run = await cl_tokens("token", env=env)
    assert run.code == 0, run.stderr
    assert run.stdout == server.issued[0] + "\n"
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("cl-tokens: WARNING: cl_tokens: shared token backend ")
    assert "carrying on with the in-process cache" in lines[0]
    assert SECRET not in run.stderr


async def test_a_lock_wait_that_runs_out_is_a_warning(
    server: FakeAuthServer, env: dict[str, str], tmp_path: Path
) -> None:
    directory = tmp_path / "shared"
    env.update(CL_TOKEN_BACKEND=directory.as_uri(), CL_LOCK_WAIT="0.5")
    assert (await cl_tokens("token", env=env)).code == 0
    for token_file in stored_tokens(directory):
        token_file.unlink()  # gone: the next run must fetch, under the lock
    (lock_file,) = directory.glob("*.lock")
    with open(lock_file, "rb") as held:  # noqa: ASYNC230 - a local file, opened once
        fcntl.flock(held, fcntl.LOCK_EX)  # another process "fetching" forever
        run = await cl_tokens("token", env=env)
    assert run.code == 0, run.stderr
    assert run.stdout == server.issued[1] + "\n"
    (line,) = warning_lines(run)
    assert "waited 0.5 s for another process's token fetch; fetching directly" in line


async def test_rejected_credentials_say_it_once(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    env["CL_CLIENT_SECRET"] = "wrong-secret-VALUE-0a1b2c3d"
    run = await cl_tokens("token", env=env)
    assert run.code == 3
    assert "token request rejected" in assert_one_error_line(run)


async def test_a_redis_url_with_a_bad_database_is_a_configuration_error(
    env: dict[str, str],
) -> None:
    run = await cl_tokens("token", "--backend", "redis://127.0.0.1:1/abc", env=env)
    assert run.code == 2
    assert "database" in assert_one_error_line(run)


# -- the status line on a terminal -------------------------------------------------------------


async def on_a_terminal(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run ``cl-tokens *args`` with stdout and stderr on a pseudo-terminal; its output."""
    controller, terminal = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cl_tokens",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=terminal,
            stderr=terminal,
            env=env,
        )
    finally:
        os.close(terminal)

    def read_all() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's last holder closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        output = await asyncio.wait_for(asyncio.to_thread(read_all), timeout)
        code = await asyncio.wait_for(process.wait(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(controller)
    return code, output.decode(errors="replace")


@pytest.mark.slow
async def test_a_long_wait_shows_a_status_line_on_a_terminal(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    host = "127.0.0.1"
    server.fail_next(1, 503, retry_after=4)  # attempt 2 comes 4 s after the first
    code, output = await on_a_terminal("token", env=env)
    assert code == 0, output
    assert server.token_requests == 2
    assert f"waiting for {host}: attempt 2 of 3, next in " in output
    # Erased before the token is printed: the token has a line of its own.
    assert output.endswith(f"\r{server.issued[0]}\r\n"), repr(output[-200:])


async def test_a_quick_run_on_a_terminal_shows_no_status(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    code, output = await on_a_terminal("token", env=env)
    assert code == 0, output
    assert "waiting" not in output
    assert output.strip() == server.issued[0]


# -- the demo honours or refuses each option ------------------------------------------------------


def summary(run: Run) -> dict[str, str]:
    rows = {}
    for line in run.stdout.splitlines():
        name, _, value = line.strip().partition("   ")
        if value:
            rows[name.strip()] = value.strip()
    return rows


@pytest.mark.parametrize(
    "args",
    [
        ["--client-id", "x", "demo"],
        ["--auth-url", "https://auth.example.com/oauth/token", "demo"],
        ["--client-secret-stdin", "demo"],
    ],
)
async def test_demo_refuses_credential_options(args: list[str]) -> None:
    run = await cl_tokens(*args, env=clean_env(), stdin="")
    assert run.code == 2
    assert "demo runs its own local token endpoint" in assert_one_error_line(run)


@pytest.mark.parametrize("flag", ["--client-id", "--auth-url", "--client-secret-stdin"])
async def test_demo_does_not_offer_credential_options(flag: str) -> None:
    run = await cl_tokens("demo", "--help", env=clean_env())
    assert run.code == 0
    assert flag not in run.stdout.split("configuration:")[0]
    refused = await cl_tokens("demo", flag, "x", env=clean_env())
    assert refused.code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "65"], "--processes: must be at most 64, not 65"),
        (["--callers", "100001"], "--callers: must be at most 100,000"),
    ],
)
async def test_demo_bounds_its_work(args: list[str], message: str) -> None:
    run = await cl_tokens("demo", *args, env=clean_env())
    assert run.code == 2
    assert message in run.stderr


async def test_demo_checks_the_tuning_variables() -> None:
    run = await cl_tokens("demo", "--callers", "10", env=clean_env(CL_ATTEMPTS="abc"))
    assert run.code == 2
    assert "CL_ATTEMPTS must be a whole number" in assert_one_error_line(run)


async def test_demo_honours_the_backend_variable_and_the_scope(tmp_path: Path) -> None:
    env = clean_env(CL_TOKEN_BACKEND=tmp_path.as_uri(), CL_AUTH_URL="https://unused.example")
    run = await cl_tokens("demo", "--callers", "20", "--scope", "market:code:eu", env=env)
    assert run.code == 0, run.stderr
    assert f"backend {tmp_path.as_uri()}," in run.stdout
    (stored,) = stored_tokens(tmp_path)
    assert "market:code:eu" in stored.read_text()


async def test_demo_refuses_memory_from_the_environment_with_processes() -> None:
    run = await cl_tokens("demo", "--processes", "2", env=clean_env(CL_TOKEN_BACKEND="memory://"))
    assert run.code == 2
    assert "CL_TOKEN_BACKEND memory:// is private to each process" in run.stderr


@pytest.mark.slow
async def test_demo_with_a_failing_shared_backend_says_so() -> None:
    run = await cl_tokens(
        "demo",
        "--backend",
        "redis://127.0.0.1:1/0",
        "--processes",
        "2",
        "--callers",
        "40",
        env=clean_env(),
    )
    assert run.code == 0, run.stderr
    assert summary(run)["token requests"] == "2"
    assert "2 token requests where one was expected" in run.stdout
    assert "every caller waits for the same single request" not in run.stdout
    (line,) = warning_lines(run)  # both workers warn; shown once
    assert "shared token backend RedisBackend" in line
