"""The ``cl-tokens`` command line: tokens for shell scripts and cron jobs, and a demo.

Configuration comes from the ``CL_*`` environment variables (see ``Settings.from_env``),
overridable by flags; the client secret only from the environment or stdin
(``--client-secret-stdin``), never from a flag, which would show in ``ps`` and shell
history. Unlike the library, whose default backend is ``memory://``, the CLI caches
tokens in a per-user directory (``$XDG_CACHE_HOME/cl-tokens``, else
``~/.cache/cl-tokens``, mode 0700), so the runs of a script or a cron job share one
token: Commerce Layer allows 30 token requests a minute.

Exit codes: 0 ok, 1 unexpected failure, 2 usage or configuration error, 3 credentials
rejected, 4 token endpoint or backend unavailable, 141 (128 + SIGPIPE) stdout closed by
its reader (``cl-tokens token | head -c0``), which is not reported. Errors are one line
on stderr; a traceback only with ``--debug``. Warnings that change the outcome are shown
without flags (see ``_cli_output``).

To add a command, write ``async def run(args) -> int`` and add it to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._cli_output import StatusLine, configure_logging
from ._errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    TokenEndpointError,
)
from ._manager import TokenManager
from ._settings import Settings, Sources, env_sources, settings_from_sources
from ._token import Token, fingerprint
from ._version import __version__
from .backends._base import redact_url
from .backends._codec import make_codec

__all__ = [
    "COMMANDS",
    "Command",
    "build_parser",
    "configure",
    "default_cache_url",
    "describe_token",
    "exit_code",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_UNAVAILABLE = 4
EXIT_BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE, as a shell reports a process killed by it

# Flags that override a setting from the environment: flag dest -> Settings field.
_OVERRIDES = {
    "client_id": "client_id",
    "scope": "scope",
    "backend": "backend",
    "auth_url": "auth_url",
}


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command without options of its own."""


@dataclass(frozen=True)
class Command:
    """A ``cl-tokens`` subcommand.

    Args:
        help: one line for ``cl-tokens --help``.
        run: the command: takes the parsed arguments, returns the exit code.
        arguments: adds the command's own options to its parser.
        hidden: an internal command: left out of ``--help`` and of argparse's
            "invalid choice" list; run only as the first argument.
        credentials: whether it takes the credential options (``--client-id``,
            ``--client-secret-stdin``, ``--auth-url``); one that brings its own refuses
            them.
        epilog: its own help epilog, instead of the configuration variables.
    """

    help: str
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    hidden: bool = False
    credentials: bool = True
    epilog: str | None = None


# -- configuration ---------------------------------------------------------------------


def default_cache_url(environ: dict[str, str] | None = None) -> str | None:
    """The CLI's default backend: ``file://`` + ``$XDG_CACHE_HOME/cl-tokens``, else
    ``~/.cache/cl-tokens``; None when there is no home directory to put it in.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG spec says. The file backend
    creates the directory with mode 0700 and warns about one that others may write to.

    Args:
        environ: the variables to read (default: ``os.environ``).
    """
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        base = Path(xdg)
    else:
        try:
            home = Path(env["HOME"]) if env.get("HOME") else Path.home()
        except (KeyError, RuntimeError):
            return None
        if not home.is_absolute() or home == Path("/"):
            return None  # no real home (a service account's "/"): nothing per-user
        base = home / ".cache"
    return (base / "cl-tokens").as_uri()


def _sources(args: argparse.Namespace) -> Sources:
    """The environment's settings with the command line's overrides on top."""
    sources = env_sources(None)
    for dest, name in _OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            sources[name] = (value, "--" + dest.replace("_", "-"))
    if sources.get("backend", (None, ""))[0] in (None, ""):
        cache = default_cache_url()
        if cache is not None:
            sources["backend"] = (cache, "the default cache directory (or CL_TOKEN_BACKEND)")
    if sources["client_id"][0] in (None, ""):
        label = sources["client_id"][1]
        sources["client_id"] = (None, f"{label} (or --client-id)")
    if getattr(args, "client_secret_stdin", False):
        secret = _secret_from_stdin()
        if not secret:
            raise ConfigurationError("--client-secret-stdin: the first line of stdin is empty")
        sources["client_secret"] = (secret, "--client-secret-stdin")
    return sources


def _secret_from_stdin() -> str:
    """The first line of stdin; typed without echo when stdin is a terminal."""
    stdin = sys.stdin
    if stdin is None or stdin.closed:  # None: started with stdin closed (``<&-``)
        raise ConfigurationError(
            "stdin is closed: --client-secret-stdin reads the client secret from the "
            "first line of stdin; pipe it in, or set CL_CLIENT_SECRET"
        )
    try:
        if stdin.isatty():
            return getpass.getpass("client secret: ")
        return stdin.readline().rstrip("\r\n")
    except EOFError:  # Ctrl-D at the prompt
        return ""
    # OSError: an unreadable stdin; ValueError: not text (never echo what was read).
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"--client-secret-stdin: cannot read stdin ({type(exc).__name__})"
        ) from None


def configure(args: argparse.Namespace) -> tuple[Settings, TokenManager]:
    """The settings and a manager from the environment and the command line.

    Args:
        args: the parsed command line.

    Raises:
        ConfigurationError: every problem, named by variable or flag.
    """
    sources = _sources(args)
    settings = settings_from_sources(sources)
    status = getattr(args, "status", None)
    if isinstance(status, StatusLine):
        status.set_endpoint(settings.auth_url, settings.attempts)
    options = settings.manager_kwargs()["backend_options"] or {}
    if "encryption_key" in options:
        # Settings has checked the key; loading it here too keeps any problem the codec
        # finds named by the key's variable, not blamed on the backend URL.
        try:
            make_codec(options["encryption_key"])
        except ConfigurationError as error:
            label = sources.get("encryption_key", (None, "CL_TOKEN_ENCRYPTION_KEY"))[1]
            raise ConfigurationError(f"{label}: {error}") from None
    try:
        return settings, TokenManager.from_settings(settings)
    except ConfigurationError as error:
        # Settings checks the backend's scheme and file:// paths; the rest of its URL
        # (a redis:// database) only the backend knows, so name where it came from.
        label = sources.get("backend", (None, "CL_TOKEN_BACKEND"))[1]
        raise ConfigurationError(f"{label} {redact_url(settings.backend)!r}: {error}") from None


# -- token, header, inspect, revoke ------------------------------------------------------


def _output(args: argparse.Namespace, text: str) -> None:
    """Print ``text`` on stdout, once the status line (on the same terminal) is gone."""
    status = getattr(args, "status", None)
    if isinstance(status, StatusLine):
        status.stop()
    print(text)


async def _token(args: argparse.Namespace) -> int:
    _, manager = configure(args)
    async with manager:
        token = await manager.token()
    _output(args, token.access_token)
    return EXIT_OK


async def _header(args: argparse.Namespace) -> int:
    _, manager = configure(args)
    async with manager:
        headers = await manager.header()
    _output(args, f"Authorization: {headers['Authorization']}")
    return EXIT_OK


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the claims as JSON")


async def _inspect(args: argparse.Namespace) -> int:
    settings, manager = configure(args)
    async with manager:
        token = await manager.token()
    info = describe_token(token, settings, time.time())
    _output(args, json.dumps(info, indent=2) if args.json else _table(info))
    return EXIT_OK


async def _revoke(args: argparse.Namespace) -> int:
    _, manager = configure(args)
    async with manager:
        revoked = await manager.revoke()
    # Revoking what is not cached is not an error: the goal (no usable cached token) holds.
    _output(args, "revoked the cached token" if revoked else "no cached token to revoke")
    return EXIT_OK


def describe_token(token: Token, settings: Settings, now: float) -> dict[str, Any]:
    """What ``inspect`` shows: the token's claims and timing, never the token itself.

    Args:
        token: the token to describe.
        settings: the settings it was obtained with.
        now: the current unix time.
    """
    claims = token.claims
    return {
        "client_id": settings.client_id,
        "organization_slug": claims.organization_slug if claims else None,
        "organization_id": claims.organization_id if claims else None,
        "application_kind": claims.application_kind if claims else None,
        "market_ids": list(claims.market_ids) if claims else [],
        "iss": claims.iss if claims else None,
        "core_api_url": token.core_api_url,
        "scope": token.scope,
        "token_type": token.token_type,
        "expires_at": datetime.fromtimestamp(token.expires_at, timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "seconds_left": round(token.seconds_left(now), 1),
        "lifetime": token.lifetime,
        "fingerprint": fingerprint(token.access_token),
        "jwt": claims is not None,
        "backend": redact_url(settings.backend),
    }


def _time_left(seconds: float) -> str:
    if seconds <= 0:
        return "expired"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h"] if hours else []
    if hours or minutes:
        parts.append(f"{minutes} min")
    parts.append(f"{secs} s")
    return " ".join(parts)


def _table(info: dict[str, Any]) -> str:
    def shown(value: Any) -> str:
        return "-" if value in (None, "", []) else str(value)

    rows = [
        ("organization", shown(info["organization_slug"])),
        ("organization id", shown(info["organization_id"])),
        ("application kind", shown(info["application_kind"])),
        ("market ids", shown(", ".join(info["market_ids"]))),
        ("issuer (iss)", shown(info["iss"])),
        ("core api", shown(info["core_api_url"])),
        ("scope", shown(info["scope"])),
        ("expires at", info["expires_at"].replace("T", " ").replace("Z", " UTC")),
        ("time left", _time_left(info["seconds_left"])),
        ("client id", shown(info["client_id"])),
        ("backend", shown(info["backend"])),
        ("token", f"{info['fingerprint']} ({'JWT' if info['jwt'] else 'opaque: no claims'})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


# -- the command table -------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from ._demo import add_demo_arguments

    add_demo_arguments(parser)


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    from ._demo import add_worker_arguments

    add_worker_arguments(parser)


async def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return await run_demo(args)


def _demo_epilog() -> str:
    from ._demo import DEMO_EPILOG

    return DEMO_EPILOG


async def _demo_worker(args: argparse.Namespace) -> int:
    from ._demo import run_worker

    return await run_worker(args)


COMMANDS: dict[str, Command] = {
    "token": Command("print an access token (cached in the configured backend)", _token),
    "header": Command("print 'Authorization: Bearer <token>'", _header),
    "inspect": Command(
        "show the token's claims and expiry (not the token)", _inspect, _inspect_arguments
    ),
    "revoke": Command("revoke the cached token and drop it from the backend", _revoke),
    "demo": Command(
        "burst thousands of concurrent callers at a local fake server: one token request",
        _demo,
        _demo_arguments,
        credentials=False,
        epilog=_demo_epilog(),
    ),
    "_demo-worker": Command(
        "one process of 'demo --processes'", _demo_worker, _worker_arguments, hidden=True
    ),
}


# -- parsing and running ---------------------------------------------------------------

_EPILOG = """\
configuration (environment variables; an empty one counts as unset):
  CL_CLIENT_ID            client id (required, or --client-id)
  CL_CLIENT_SECRET        client secret (none for sales-channel credentials;
                          or one line on stdin with --client-secret-stdin)
  CL_SCOPE                default scope, e.g. market:code:europe
  CL_AUTH_URL             token endpoint (default https://auth.commercelayer.io/oauth/token)
  CL_TOKEN_BACKEND        memory:// | file:///var/cache/cl-tokens | redis://host:6379/0
                          (default here: file://$XDG_CACHE_HOME/cl-tokens, else
                          file://~/.cache/cl-tokens, so runs share one token)
  CL_TOKEN_ENCRYPTION_KEY Fernet key for tokens stored by file:// and redis://
  CL_BODY_ENCODING        json | form
  CL_SAFETY_MARGIN, CL_ATTEMPTS, CL_FETCH_DEADLINE, ... every tuning option, upper case

exit codes: 0 ok, 1 unexpected failure, 2 usage or configuration error,
  3 credentials rejected, 4 token endpoint or backend unavailable,
  141 stdout closed by its reader (a pipe), not reported
"""


# The options that name the credential and its endpoint: a command that brings its own
# (the demo) leaves them out of its parser and refuses them given before its name.
CREDENTIAL_OPTIONS = {
    "client_id": "--client-id",
    "client_secret_stdin": "--client-secret-stdin",
    "auth_url": "--auth-url",
}


def _common_options(credentials: bool = True) -> argparse.ArgumentParser:
    # SUPPRESS: an option left out does not set an attribute, so one given before the
    # command is not overwritten by the subcommand parser's default.
    common = argparse.ArgumentParser(
        add_help=False, argument_default=argparse.SUPPRESS, allow_abbrev=False
    )
    config = common.add_argument_group("configuration (overrides the environment)")
    if credentials:
        config.add_argument("--client-id", metavar="ID", help="instead of $CL_CLIENT_ID")
        config.add_argument(
            "--client-secret-stdin",
            action="store_true",
            help="read the client secret from the first line of stdin (never pass it as a flag)",
        )
    config.add_argument("--scope", help="instead of $CL_SCOPE, e.g. market:code:europe")
    config.add_argument("--backend", metavar="URL", help="instead of $CL_TOKEN_BACKEND")
    if credentials:
        config.add_argument("--auth-url", metavar="URL", help="instead of $CL_AUTH_URL")
    output = common.add_argument_group("output")
    output.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the library's info log (fetches, retries); warnings that "
        "change the outcome are shown without it",
    )
    output.add_argument("--debug", action="store_true", help="debug log and error tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``cl-tokens`` argument parser, one subparser per public entry of ``COMMANDS``.

    Hidden commands are left out altogether (not only from ``--help``: argparse would
    list them in its "invalid choice" message); ``main`` parses them with
    ``_hidden_parser`` when one is the first argument.
    """
    common = _common_options()
    own = _common_options(credentials=False)
    parser = argparse.ArgumentParser(
        prog="cl-tokens",
        description="Get, cache and inspect Commerce Layer access tokens.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
        allow_abbrev=False,  # "--client-secret=x" must not pass for --client-secret-stdin
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        if command.hidden:
            continue
        sub = subparsers.add_parser(
            name,
            parents=[common if command.credentials else own],
            help=command.help,
            description=command.help,
            epilog=command.epilog or _EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        command.arguments(sub)
    return parser


def _hidden_parser(name: str) -> argparse.ArgumentParser:
    """The parser of the hidden command ``name``: ``cl-tokens <name> [options]``."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(
        prog=f"cl-tokens {name}",
        description=command.help,
        parents=[_common_options()],
        allow_abbrev=False,
    )
    command.arguments(parser)
    parser.set_defaults(command=name)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; usage errors exit 2 (argparse's ``SystemExit``)."""
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].hidden:
        return _hidden_parser(argv[0]).parse_args(argv[1:])
    return build_parser().parse_args(argv)


def exit_code(error: BaseException) -> int:
    """The exit code for ``error``: 2 configuration, 3 rejected, 4 unavailable, else 1.

    Args:
        error: what the command raised.
    """
    if isinstance(error, ConfigurationError):
        return EXIT_USAGE
    if isinstance(error, AuthenticationError):
        return EXIT_REJECTED
    if isinstance(error, (TokenEndpointError, BackendError)):
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE


_SECRET_FLAG = "clientsecret"  # noqa: S105 - the flag name the CLI refuses, not a secret
# "--client-se": the shortest abbreviation of --client-secret that is taken for it.
_SECRET_ABBREVIATION = len("clientse")


def _is_secret_flag(arg: str) -> bool:
    """Whether ``arg`` looks like an attempt to pass the client secret as a flag.

    That is ``--client-secret[...]`` (but ``--client-secret-stdin`` itself),
    ``--secret[...]``, an abbreviation such as ``--client-secre``, in any case and
    with ``_`` for ``-``. argparse would echo such a flag and its value in its
    "unrecognized arguments" message, so ``main`` refuses it before argparse parses.
    """
    if not arg.startswith("-") or arg == "--client-secret-stdin":
        return False
    name = arg.split("=", 1)[0].lower()
    compact = name.lstrip("-").replace("-", "").replace("_", "")
    return (
        compact.startswith(_SECRET_FLAG)
        or compact.startswith("secret")
        or (len(compact) >= _SECRET_ABBREVIATION and _SECRET_FLAG.startswith(compact))
    )


def _stdout_closed() -> int:
    """Quiet ``stdout`` after its reader went away (``cl-tokens token | true``).

    As the Python docs advise for ``BrokenPipeError``: point stdout at devnull, so
    the interpreter's own flush at exit finds no broken pipe to complain about.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cl-tokens`` and return its exit code.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    try:
        try:
            return _main(sys.argv[1:] if argv is None else list(argv))
        finally:
            # Flushed here, not at interpreter exit, so a closed pipe is caught below.
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()


def _refuse_credential_options(args: argparse.Namespace) -> None:
    """A command with its own endpoint and credentials refuses those given before it."""
    given = [flag for dest, flag in CREDENTIAL_OPTIONS.items() if hasattr(args, dest)]
    if given:
        raise ConfigurationError(
            f"{args.command} runs its own local token endpoint with its own credentials: "
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not used"
        )


def _main(argv: list[str]) -> int:
    if any(_is_secret_flag(arg) for arg in argv):
        # Caught before argparse, whose "unrecognized arguments" message would echo it.
        print(
            "cl-tokens: error: the client secret is never taken from a flag (it would show "
            "in ps and shell history); set CL_CLIENT_SECRET or use --client-secret-stdin",
            file=sys.stderr,
        )
        return EXIT_USAGE
    args = _parse(argv)  # usage errors exit 2 here
    debug = bool(getattr(args, "debug", False))
    status = configure_logging(bool(getattr(args, "verbose", False)), debug, sys.stderr)
    command = COMMANDS[args.command]
    try:
        if not command.credentials:
            _refuse_credential_options(args)
        if command.credentials:
            args.status = status  # configure() names the endpoint on it
            return asyncio.run(status.run(command.run(args)))
        return asyncio.run(command.run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise  # the reader of stdout went away: main exits quietly with 141
    except Exception as error:
        if debug:
            traceback.print_exc()
        code = exit_code(error)
        message = str(error) or type(error).__name__
        if code == EXIT_FAILURE:
            message = f"{type(error).__name__}: {message} (run with --debug for a traceback)"
        print(f"cl-tokens: error: {' '.join(message.split())}", file=sys.stderr)
        return code
