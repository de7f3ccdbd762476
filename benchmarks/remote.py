"""A ``FakeAuthServer`` in a process of its own, so its work is not timed with the client's.

In the benchmark's own event loop, the server's request handling (and its ``latency``
sleep) competes with 10,000 waking coroutines for the same thread, which inflates both
the subject and its floor. Here it runs elsewhere, like a real token endpoint.

Child protocol (``python -m benchmarks.remote --latency S``): print one JSON line with
``url``, ``client_id`` and ``client_secret``; then answer each ``count`` line on stdin
with the number of token requests served so far; exit at end of input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["RemoteServer"]

ROOT = Path(__file__).resolve().parent.parent


class RemoteServer:
    """The parent's handle: ``url``, ``client_id``, ``client_secret``, ``requests()``."""

    def __init__(self, *, latency: float = 0.0, expires_in: float = 7200.0) -> None:
        self.latency = latency
        self._expires_in = expires_in
        self._proc: asyncio.subprocess.Process | None = None
        self.url = self.client_id = self.client_secret = ""

    async def __aenter__(self) -> RemoteServer:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.remote",
            "--latency",
            repr(self.latency),
            "--expires-in",
            repr(self._expires_in),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
            env=env,
        )
        hello = json.loads(await self._line())
        self.url, self.client_id = hello["url"], hello["client_id"]
        self.client_secret = hello["client_secret"]
        return self

    async def _line(self) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError("the token server process exited")
        return line.decode()

    async def requests(self) -> int:
        """Token requests the server has answered so far."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(b"count\n")
        await self._proc.stdin.drain()
        return int(await self._line())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def _serve(latency: float, expires_in: float) -> None:
    from cl_tokens.testing import FakeAuthServer

    loop = asyncio.get_running_loop()
    async with FakeAuthServer(latency=latency, expires_in=expires_in) as server:
        hello = {
            "url": server.url,
            "client_id": server.client_id,
            "client_secret": server.client_secret,
        }
        print(json.dumps(hello), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            print(server.token_requests, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--expires-in", type=float, default=7200.0)
    args: Any = parser.parse_args(argv)
    asyncio.run(_serve(args.latency, args.expires_in))


if __name__ == "__main__":
    main()
