"""A raw asyncio HTTP/1.1 server that sends each answer in the segments a test chooses.

aiohttp.web always writes a small body in one piece; real networks (and TLS records)
do not. This server writes the status line, headers and body as separate TCP writes,
with a pause between them, so the client sees a body arrive in parts.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any


@dataclass
class Reply:
    """One answer: status, headers and body segments (sent one by one)."""

    status: int = 200
    segments: Sequence[bytes] = (b"",)
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    pause: float = 0.05
    hang: bool = False  # read the request, then never answer

    @classmethod
    def json(cls, data: Any, *, parts: int = 2, **kwargs: Any) -> Reply:
        """``data`` as JSON, cut into ``parts`` segments of about equal size."""
        body = json.dumps(data).encode()
        step = max(1, -(-len(body) // parts))
        return cls(segments=[body[i : i + step] for i in range(0, len(body), step)], **kwargs)


_REASONS = {200: "OK", 401: "Unauthorized", 429: "Too Many Requests", 503: "Service Unavailable"}


class RawHTTPServer:
    """Answers every request with the next ``Reply`` of ``replies`` (the last repeats).

    ``requests`` holds (method, path, headers, body) of every request received.
    """

    def __init__(self, replies: Sequence[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.base_url = ""

    @property
    def url(self) -> str:
        return f"{self.base_url}/oauth/token"

    async def __aenter__(self) -> RawHTTPServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, path, headers, body))
                index = min(len(self.requests), len(self.replies)) - 1
                reply = self.replies[index]
                if reply.hang:
                    await asyncio.sleep(3600)
                await self._write(writer, reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the server is closing: end quietly (asyncio logs a cancelled handler)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _write(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}"]
        headers = {"Content-Type": "application/json", **reply.headers}
        if reply.chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers.setdefault("Content-Length", str(sum(len(s) for s in reply.segments)))
        head += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        for segment in reply.segments:
            await asyncio.sleep(reply.pause)
            if reply.chunked:
                if segment:
                    writer.write(f"{len(segment):x}\r\n".encode() + segment + b"\r\n")
            else:
                writer.write(segment)
            await writer.drain()
        if reply.chunked:
            await asyncio.sleep(reply.pause)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
