"""The ``cl-tokens`` command, run as a subprocess against a FakeAuthServer in the test."""

from __future__ import annotations

import argparse
import getpass
import io
import json
import re
import sys
from pathlib import Path

import pytest
from cli_support import (
    SECRET,
    Run,
    assert_one_error_line,
    assert_warnings_then_one_error_line,
    cl_tokens,
    cl_tokens_into_closed_pipe,
    clean_env,
    closed_port_url,
    exists,
    stored_tokens,
)

from cl_tokens import ConfigurationError, Token, __version__, _cli, _settings
from cl_tokens._cli import describe_token
from cl_tokens._settings import Settings
from cl_tokens.testing import FakeAuthServer

WRONG_SECRET = "wrong-secret-VALUE-0a1b2c3d"


@pytest.fixture
def env(server: FakeAuthServer, tmp_path: Path) -> dict[str, str]:
    """Configuration for the test's server, as a user would export it, with a cache
    directory of the test's own."""
    return clean_env(
        CL_CLIENT_ID=server.client_id,
        CL_CLIENT_SECRET=SECRET,
        CL_AUTH_URL=server.url,
        XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
    )


# -- token and header -------------------------------------------------------------------------


async def test_token_prints_the_access_token(server: FakeAuthServer, env: dict[str, str]) -> None:
    run = await cl_tokens("token", env=env)
    assert run.code == 0, run.stderr
    assert run.stdout == server.issued[0] + "\n"
    assert run.stderr == ""
    assert server.requests[0].body["client_secret"] == SECRET


async def test_header_prints_the_authorization_header(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    run = await cl_tokens("header", env=env)
    assert run.code == 0, run.stderr
    assert run.stdout == f"Authorization: Bearer {server.issued[0]}\n"
    assert run.stderr == ""


async def test_file_backend_lets_later_invocations_reuse_the_token(
    server: FakeAuthServer, env: dict[str, str], tmp_path: Path
) -> None:
    env["CL_TOKEN_BACKEND"] = f"file://{tmp_path}"
    first = await cl_tokens("token", env=env)
    second = await cl_tokens("token", env=env)
    header = await cl_tokens("header", env=env)
    assert [first.code, second.code, header.code] == [0, 0, 0]
    assert first.stdout == second.stdout == server.issued[0] + "\n"
    assert header.stdout == f"Authorization: Bearer {server.issued[0]}\n"
    assert server.token_requests == 1
    assert stored_tokens(tmp_path)


async def test_memory_backend_fetches_on_every_invocation(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    # The contrast with the file backend: memory:// dies with the process.
    env["CL_TOKEN_BACKEND"] = "memory://"
    for _ in range(2):
        assert (await cl_tokens("token", env=env)).code == 0
    assert server.token_requests == 2


async def test_sales_channel_credentials_need_no_secret(env: dict[str, str]) -> None:
    async with FakeAuthServer(client_id="sales-channel", client_secret=None) as public:
        env.pop("CL_CLIENT_SECRET")
        env.update(CL_CLIENT_ID="sales-channel", CL_AUTH_URL=public.url)
        run = await cl_tokens("token", env=env)
        assert run.code == 0, run.stderr
        assert "client_secret" not in public.requests[0].body


# -- configuration: flags, stdin, errors ------------------------------------------------------


@pytest.mark.parametrize("before", [True, False], ids=["flags-before", "flags-after"])
async def test_flags_override_the_environment(
    server: FakeAuthServer, env: dict[str, str], tmp_path: Path, before: bool
) -> None:
    env.update(CL_CLIENT_ID="not-this-one", CL_AUTH_URL=closed_port_url())
    flags = [
        "--client-id",
        server.client_id,
        "--auth-url",
        server.url,
        "--scope",
        "market:code:europe",
        "--backend",
        f"file://{tmp_path}",
    ]
    args = [*flags, "inspect", "--json"] if before else ["inspect", "--json", *flags]
    run = await cl_tokens(*args, env=env)
    assert run.code == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["client_id"] == server.client_id
    assert info["scope"] == "market:code:europe"
    assert info["backend"] == f"file://{tmp_path}"
    assert server.requests[0].body["scope"] == "market:code:europe"


async def test_client_secret_from_stdin(server: FakeAuthServer, env: dict[str, str]) -> None:
    env.pop("CL_CLIENT_SECRET")
    run = await cl_tokens("token", "--client-secret-stdin", env=env, stdin=SECRET + "\n")
    assert run.code == 0, run.stderr
    assert run.stdout.strip() == server.issued[0]
    assert server.requests[0].body["client_secret"] == SECRET


async def test_client_secret_from_stdin_wins_over_the_environment(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    env["CL_CLIENT_SECRET"] = WRONG_SECRET
    run = await cl_tokens("--client-secret-stdin", "header", env=env, stdin=SECRET + "\r\n")
    assert run.code == 0, run.stderr


async def test_empty_stdin_secret_is_a_configuration_error(env: dict[str, str]) -> None:
    run = await cl_tokens("token", "--client-secret-stdin", env=env, stdin="")
    assert run.code == 2
    assert "--client-secret-stdin" in assert_one_error_line(run)


async def test_closed_stdin_is_a_configuration_error(env: dict[str, str]) -> None:
    env.pop("CL_CLIENT_SECRET")
    run = await cl_tokens("token", "--client-secret-stdin", env=env, close_stdin=True)
    assert run.code == 2, run.stderr
    line = assert_one_error_line(run)
    assert line.startswith("cl-tokens: error: stdin is closed: --client-secret-stdin")
    assert "AttributeError" not in line


def test_client_secret_from_a_terminal_is_read_without_echo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    prompts: list[str] = []

    def fake_getpass(prompt: str = "Password: ", stream: object = None) -> str:
        prompts.append(prompt)
        return SECRET

    terminal = Terminal("echoed-if-read-with-readline\n")
    monkeypatch.setattr(sys, "stdin", terminal)
    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    monkeypatch.setenv("CL_CLIENT_ID", "my-client")
    sources = _cli._sources(argparse.Namespace(client_secret_stdin=True))
    assert sources["client_secret"] == (SECRET, "--client-secret-stdin")
    assert prompts == ["client secret: "]
    assert terminal.tell() == 0  # nothing read through the echoing stream


@pytest.mark.parametrize(
    "flag",
    [
        "--client-secret",
        f"--client-secret={WRONG_SECRET}",
        "--client-secret-stdin=x",
        "--client-secret-s",
        "--client-secre",
        f"--client-secre={WRONG_SECRET}",
        "--client-se",
        "--client_secret",
        "--CLIENT-SECRET",
        "--secret",
        f"--secret={WRONG_SECRET}",
        "--secret-key",
    ],
)
async def test_the_secret_is_never_taken_from_a_flag(env: dict[str, str], flag: str) -> None:
    run = await cl_tokens("token", flag, WRONG_SECRET, env=env)
    assert run.code == 2
    line = assert_one_error_line(run)
    assert "never taken from a flag" in line
    assert WRONG_SECRET not in run.stdout + run.stderr


@pytest.mark.parametrize(
    "arg", ["--client-secret-stdin", "--client-id", "--client-id=x", "--client", "-v", "token"]
)
def test_other_arguments_are_not_taken_for_secret_flags(arg: str) -> None:
    assert not _cli._is_secret_flag(arg)


async def test_missing_client_id_exits_2_naming_the_variable(env: dict[str, str]) -> None:
    env.pop("CL_CLIENT_ID")
    run = await cl_tokens("token", env=env)
    assert run.code == 2
    assert "CL_CLIENT_ID (or --client-id) is required" in assert_one_error_line(run)
    assert SECRET not in run.stderr


async def test_invalid_settings_exit_2_listing_each_variable(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    env.update(
        CL_CLIENT_SECRET=f" {WRONG_SECRET}",
        CL_SAFETY_MARGIN="soon",
        CL_STRICT="maybe",
        CL_TOKEN_BACKEND="nope://x",
    )
    run = await cl_tokens("header", env=env)
    assert run.code == 2
    line = assert_one_error_line(run)
    for variable in ("CL_CLIENT_SECRET", "CL_TOKEN_BACKEND", "CL_SAFETY_MARGIN", "CL_STRICT"):
        assert variable in line
    assert WRONG_SECRET not in run.stdout + run.stderr
    assert server.token_requests == 0


async def test_invalid_flag_value_is_named_by_flag(env: dict[str, str]) -> None:
    run = await cl_tokens("token", "--auth-url", "http://auth.example.com/oauth/token", env=env)
    assert run.code == 2
    assert "--auth-url must use https" in assert_one_error_line(run)


async def test_bad_backend_url_exits_2(env: dict[str, str]) -> None:
    env["CL_TOKEN_BACKEND"] = "file://"
    run = await cl_tokens("token", env=env)
    assert run.code == 2
    line = assert_one_error_line(run)
    assert "CL_TOKEN_BACKEND 'file://': a file:// URL needs an absolute directory" in line


async def test_relative_file_backend_path_is_named_by_flag(env: dict[str, str]) -> None:
    run = await cl_tokens("token", "--backend", "file://var/cache/cl-tokens", env=env)
    assert run.code == 2
    line = assert_one_error_line(run)
    assert "--backend 'file://var/cache/cl-tokens': a file:// URL takes an absolute path" in line


async def test_bad_encryption_key_is_named_by_its_variable(
    env: dict[str, str], tmp_path: Path
) -> None:
    key = "not-a-fernet-key-VALUE-0a1b2c3d"
    env.update(CL_TOKEN_BACKEND=f"file://{tmp_path}", CL_TOKEN_ENCRYPTION_KEY=key)
    run = await cl_tokens("token", env=env)
    assert run.code == 2
    line = assert_one_error_line(run)
    assert "CL_TOKEN_ENCRYPTION_KEY is not a Fernet key" in line
    assert "CL_TOKEN_BACKEND" not in line
    assert key not in run.stdout + run.stderr


def test_a_key_the_codec_refuses_is_not_blamed_on_the_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Should Settings ever let a key through that the codec refuses, the CLI still
    # names the key's variable, not CL_TOKEN_BACKEND.
    monkeypatch.setattr(_settings, "_encryption_key_problem", lambda text: None)
    monkeypatch.setenv("CL_CLIENT_ID", "my-client")
    monkeypatch.setenv("CL_TOKEN_BACKEND", f"file://{tmp_path}")
    monkeypatch.setenv("CL_TOKEN_ENCRYPTION_KEY", "not-a-fernet-key")
    with pytest.raises(ConfigurationError) as caught:
        _cli.configure(argparse.Namespace())
    message = str(caught.value)
    assert message.startswith("CL_TOKEN_ENCRYPTION_KEY: ")
    assert "not a Fernet key" in message
    assert "CL_TOKEN_BACKEND" not in message
    assert "not-a-fernet-key" not in message


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["token", "--no-such-flag"]])
async def test_usage_errors_exit_2(env: dict[str, str], args: list[str]) -> None:
    run = await cl_tokens(*args, env=env)
    assert run.code == 2
    assert "usage: cl-tokens" in run.stderr


async def test_hidden_commands_are_not_offered(env: dict[str, str]) -> None:
    run = await cl_tokens("frobnicate", env=env)
    assert run.code == 2
    assert "invalid choice: 'frobnicate' (choose from 'token', 'header'" in run.stderr
    assert "_demo-worker" not in run.stderr
    worker = await cl_tokens("_demo-worker", env=env)  # still there for the demo
    assert worker.code == 2
    assert "the following arguments are required: --callers" in worker.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["token"],
        ["header"],
        ["inspect"],
        ["inspect", "--json"],
        ["demo", "--callers", "50", "--latency-ms", "1"],
    ],
)
async def test_closed_stdout_exits_141_quietly(env: dict[str, str], args: list[str]) -> None:
    run = await cl_tokens_into_closed_pipe(*args, env=env)
    assert run.code == 141, run.stderr
    assert run.stderr == ""


async def test_version_and_help(env: dict[str, str]) -> None:
    version = await cl_tokens("--version", env=env)
    assert version.code == 0
    assert version.stdout.strip() == f"cl-tokens {__version__}"
    help_ = await cl_tokens("--help", env=env)
    assert help_.code == 0
    for command in ("token", "header", "inspect", "revoke", "demo", "CL_TOKEN_BACKEND"):
        assert command in help_.stdout
    assert "141 stdout closed by its reader" in help_.stdout
    assert "_demo-worker" not in help_.stdout


# -- errors from the endpoint ----------------------------------------------------------------


async def test_wrong_secret_exits_3_without_the_secret(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    env["CL_CLIENT_SECRET"] = WRONG_SECRET
    run = await cl_tokens("token", env=env)
    assert run.code == 3
    line = assert_one_error_line(run)
    assert "token request rejected (HTTP 401: UNAUTHORIZED invalid_client)" in line
    assert run.stdout == ""
    assert WRONG_SECRET not in run.stderr
    assert server.token_requests == 1  # a rejection is not retried


async def test_verbose_shows_library_warnings_and_debug_a_traceback(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    env["CL_CLIENT_SECRET"] = WRONG_SECRET
    quiet = await cl_tokens("token", env=env)
    verbose = await cl_tokens("token", "--verbose", env=env)
    debug = await cl_tokens("--debug", "token", env=env)
    assert "WARNING" not in quiet.stderr
    assert "cl-tokens: WARNING: cl_tokens: token request for client" in verbose.stderr
    assert "Traceback" not in verbose.stderr
    assert "Traceback (most recent call last)" in debug.stderr
    assert "AuthenticationError" in debug.stderr
    assert [quiet.code, verbose.code, debug.code] == [3, 3, 3]
    assert verbose.stderr.splitlines()[-1] == quiet.stderr.strip()
    for run in (quiet, verbose, debug):
        assert WRONG_SECRET not in run.stdout + run.stderr


async def test_endpoint_down_exits_4_quickly(env: dict[str, str]) -> None:
    env.update(
        CL_AUTH_URL=closed_port_url(),
        CL_ATTEMPTS="1",
        CL_ATTEMPT_TIMEOUT="2",
        CL_FETCH_DEADLINE="3",
    )
    run = await cl_tokens("header", env=env)
    assert run.code == 4
    warnings, error = assert_warnings_then_one_error_line(run)
    assert "token endpoint unreachable" in error
    # The back-off is kept in the cache directory: the next run is told, not surprised.
    assert ["no token request for this credential" in line for line in warnings] == [True]
    assert run.seconds < 10
    assert SECRET not in run.stdout + run.stderr


async def test_endpoint_failing_exits_4(server: FakeAuthServer, env: dict[str, str]) -> None:
    server.fail_next(2, 503)
    env.update(CL_ATTEMPTS="2", CL_BACKOFF_BASE="0.01", CL_BACKOFF_CAP="0.01")
    run = await cl_tokens("token", env=env)
    assert run.code == 4
    warnings, error = assert_warnings_then_one_error_line(run)
    assert "HTTP 503" in error
    assert ["token endpoint failing" in line for line in warnings] == [True]
    assert server.token_requests == 2


async def test_unusable_backend_in_strict_mode_exits_4(env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file-not-a-directory"
    blocker.write_text("")
    env.update(CL_TOKEN_BACKEND=f"file://{blocker}/cache", CL_STRICT="true")
    run = await cl_tokens("token", env=env)
    assert run.code == 4
    assert "file backend" in assert_one_error_line(run)


# -- inspect -------------------------------------------------------------------------------------


async def test_inspect_shows_claims_not_the_token(
    server: FakeAuthServer, env: dict[str, str]
) -> None:
    env["CL_SCOPE"] = "market:code:europe"
    run = await cl_tokens("inspect", env=env)
    assert run.code == 0, run.stderr
    token = server.issued[0]
    assert token not in run.stdout
    assert token.split(".")[1] not in run.stdout  # not even the claims segment
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in run.stdout.splitlines())
    assert rows["organization"] == server.organization_slug
    assert rows["application kind"] == "integration"
    assert rows["market ids"] == "europe"
    assert rows["issuer (iss)"] == server.base_url
    assert rows["core api"] == f"https://{server.organization_slug}.commercelayer.io"
    assert rows["scope"] == "market:code:europe"
    assert rows["expires at"].endswith(" UTC")
    assert re.fullmatch(r"1 h 59 min \d+ s|2 h 0 min 0 s", rows["time left"])
    assert rows["token"] == f"…{token[-4:]} (JWT)"


async def test_inspect_json(server: FakeAuthServer, env: dict[str, str]) -> None:
    run = await cl_tokens("inspect", "--json", env=env)
    assert run.code == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["organization_slug"] == server.organization_slug
    assert info["application_kind"] == "integration"
    assert info["market_ids"] == []
    assert info["iss"] == server.base_url
    assert info["core_api_url"] == f"https://{server.organization_slug}.commercelayer.io"
    assert info["scope"] == "market:all"
    assert 7100 < info["seconds_left"] <= 7200
    assert info["expires_at"].endswith("Z")
    assert info["fingerprint"] == "…" + server.issued[0][-4:]
    assert server.issued[0] not in run.stdout


def test_describe_token_of_an_opaque_token() -> None:
    token = Token(access_token="opaque-token-1234", token_type="bearer", scope=None, expires_at=90)
    info = describe_token(token, Settings(client_id="x"), now=30)
    assert info["jwt"] is False
    assert info["organization_slug"] is None
    assert info["market_ids"] == []
    assert info["seconds_left"] == 60
    assert info["expires_at"] == "1970-01-01T00:01:30Z"
    assert "opaque-token-1234" not in json.dumps(info)


# -- revoke --------------------------------------------------------------------------------------


async def test_revoke_revokes_the_cached_token(
    server: FakeAuthServer, env: dict[str, str], tmp_path: Path
) -> None:
    env["CL_TOKEN_BACKEND"] = f"file://{tmp_path}"
    nothing = await cl_tokens("revoke", env=env)
    assert (nothing.code, nothing.stdout) == (0, "no cached token to revoke\n")
    assert (await cl_tokens("token", env=env)).code == 0
    run = await cl_tokens("revoke", env=env)
    assert (run.code, run.stdout) == (0, "revoked the cached token\n"), run.stderr
    assert server.issued[0] in server.revoked
    again = await cl_tokens("token", env=env)
    assert again.stdout.strip() == server.issued[1]


# -- demo ---------------------------------------------------------------------------------------


def summary(run: Run) -> dict[str, str]:
    rows = {}
    for line in run.stdout.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2:
            rows[parts[0]] = parts[1]
    return rows


async def test_demo_makes_one_token_request_for_every_caller() -> None:
    # No configuration at all: the demo brings its own server and credentials.
    run = await cl_tokens("demo", "--callers", "500", "--latency-ms", "20", env=clean_env())
    assert run.code == 0, run.stderr
    rows = summary(run)
    assert rows["callers served"] == "500 of 500"
    assert rows["token requests"] == "1"
    assert re.fullmatch(
        r"p50 \S+ \S+\s+p90 \S+ \S+\s+p99 \S+ \S+\s+max \S+ \S+", rows["cold burst"]
    )
    assert "warm burst" in rows
    assert "\r" not in run.stdout  # no progress line when stdout is not a terminal
    assert "1 process, backend memory://" in run.stdout


@pytest.mark.slow
async def test_demo_processes_share_a_file_backend(tmp_path: Path) -> None:
    backend = f"file://{tmp_path}"
    run = await cl_tokens(
        "demo", "--backend", backend, "--processes", "3", "--callers", "300", env=clean_env()
    )
    assert run.code == 0, run.stderr
    rows = summary(run)
    assert rows["callers served"] == "300 of 300"
    assert rows["token requests"] == "1"
    assert f"3 worker processes, backend {backend}" in run.stdout
    assert stored_tokens(tmp_path)


@pytest.mark.slow
async def test_demo_processes_without_backend_use_a_temporary_directory() -> None:
    run = await cl_tokens("demo", "--processes", "2", "--callers", "50", env=clean_env())
    assert run.code == 0, run.stderr
    assert summary(run)["token requests"] == "1"
    match = re.search(r"backend (file://\S+),", run.stdout)
    assert match is not None
    assert not exists(Path(match.group(1).removeprefix("file://")))  # cleaned up


async def test_demo_rejects_memory_backend_with_processes() -> None:
    run = await cl_tokens("demo", "--backend", "memory://", "--processes", "2", env=clean_env())
    assert run.code == 2
    assert "memory:// is private to each process" in assert_one_error_line(run)


@pytest.mark.parametrize("args", [["--callers", "0"], ["--processes", "x"], ["--latency-ms", "-1"]])
async def test_demo_usage_errors(args: list[str]) -> None:
    run = await cl_tokens("demo", *args, env=clean_env())
    assert run.code == 2
    assert "usage: cl-tokens demo" in run.stderr
