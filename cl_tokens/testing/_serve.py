"""``python -m cl_tokens.testing serve [--port N] [--host H]``: a FakeAuthServer on its own.

For trying the CLI without credentials, and for the tests of services written in other
languages. It prints three lines on stdout, each ``NAME=value`` with the value quoted
for a POSIX shell, then serves until SIGINT or SIGTERM::

    CL_AUTH_URL=http://127.0.0.1:8800/oauth/token
    CL_CLIENT_ID=test-client-id
    CL_CLIENT_SECRET=Yc1...

ready to be sourced by a shell (``serve > fake.env &``, then ``set -a; . ./fake.env``
once it has three lines) and used by ``cl-tokens``. The key set is at
``<base>/.well-known/jwks.json``; the client secret is random unless ``--sales-channel``
(no secret) is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shlex
import signal
import sys
from collections.abc import Sequence

from ._fake_server import FakeAuthServer

__all__ = ["main"]


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, not {text!r}") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seconds, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cl_tokens.testing",
        description="Test tools of cl_tokens.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run a fake Commerce Layer token server until SIGINT or SIGTERM",
        description="Run a fake Commerce Layer token server until SIGINT or SIGTERM. "
        "Prints CL_AUTH_URL, CL_CLIENT_ID and CL_CLIENT_SECRET, one NAME=value line each.",
        allow_abbrev=False,
    )
    serve.add_argument("--port", type=_port, default=0, help="0 (default): a free port")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (127.0.0.1); anything else lets others in",
    )
    serve.add_argument("--client-id", default="test-client-id", help="(test-client-id)")
    serve.add_argument(
        "--sales-channel",
        action="store_true",
        help="credentials without a secret, as a sales channel's",
    )
    serve.add_argument(
        "--expires-in", type=_seconds, default=7200.0, help="token lifetime in seconds (7200)"
    )
    return parser


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 then."""
    secret = None if args.sales_channel else secrets.token_urlsafe(24)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with FakeAuthServer(
            client_id=args.client_id,
            client_secret=secret,
            expires_in=args.expires_in,
            host=args.host,
            port=args.port,
        ) as server:
            lines = {
                "CL_AUTH_URL": server.url,
                "CL_CLIENT_ID": server.client_id,
                "CL_CLIENT_SECRET": secret or "",
            }
            for name, value in lines.items():
                print(f"{name}={shlex.quote(value) if value else ''}")
            sys.stdout.flush()
            print(
                f"fake token server at {server.base_url} (key set: {server.jwks_url}); "
                "SIGINT or SIGTERM stops it",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m cl_tokens.testing``; the exit code.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(serve(args))
    except BrokenPipeError:  # whoever read the three lines went away
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 141
    except OSError as error:  # the port is taken, the host is not ours
        print(f"python -m cl_tokens.testing: error: {error}", file=sys.stderr)
        return 1
