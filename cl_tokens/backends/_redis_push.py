"""Push wake-ups for the Redis backend: one pub/sub connection per client per event loop.

The writer of a token publishes the stored value (the same bytes: digest, then the
codec's encrypted or MAC'd payload) on ``cl_tokens:written:{K}``, in the slot of the
key ``{K}``; a holder that releases without writing publishes an empty message. Every
waiter of a process shares one ``PSUBSCRIBE cl_tokens:written:*`` connection: a reader
task hands each message to the futures registered for its channel. A pattern, not one
``SUBSCRIBE`` per key: it is confirmed once, so no wait pays a subscription round trip,
and writes are rare (one per token lifetime per scope), so receiving every scope's
writes costs nothing that matters.

A waiter registers its future and waits for the subscription to be confirmed *before*
it re-reads the key, so a write between that read and the wait still wakes it. When
pub/sub fails (a connection lost, a proxy without it, a Redis Cluster client, which has
no pub/sub here) waiters poll instead, and the listener retries after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

__all__ = ["CHANNEL_PREFIX", "Listener", "channel_for"]

CHANNEL_PREFIX = "cl_tokens:written:"
_PATTERN = CHANNEL_PREFIX + "*"
#: After pub/sub failed, waiters poll for this long before it is tried again.
_RETRY_AFTER = 5.0
_SUBSCRIBE_WAIT = 1.0


def channel_for(key: str) -> str:
    """The channel on which writes of ``key`` are announced (hash-tagged like ``{key}``)."""
    return CHANNEL_PREFIX + "{" + key + "}"


class Listener:
    """The pub/sub connection of one client on one event loop, and its waiters.

    Attributes:
        connections: pub/sub connections opened so far (tests count them).
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._waiters: dict[str, set[asyncio.Future[bytes]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pubsub: Any = None
        self._failed_until = 0.0  # monotonic
        self.connections = 0

    async def watch(self, channel: str, timeout: float) -> asyncio.Future[bytes] | None:
        """A future that the next message on ``channel`` resolves, once the subscription
        is confirmed (at most ``timeout`` seconds); None when pub/sub is unavailable.
        Pair every future with ``unwatch``."""
        if time.monotonic() < self._failed_until or not hasattr(self._client, "pubsub"):
            return None
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            self._task = loop.create_task(self._run(self._ready))
        ready = self._ready
        assert ready is not None  # noqa: S101 - set with the task (for mypy)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, set()).add(future)
        if not ready.done():
            # A slow confirmation is waited out for a while; meanwhile, polling.
            await asyncio.wait((ready,), timeout=min(timeout, _SUBSCRIBE_WAIT))
        if not ready.done() or ready.cancelled() or ready.exception() is not None:
            self.unwatch(channel, future)
            return None
        return future

    def unwatch(self, channel: str, future: asyncio.Future[bytes]) -> None:
        waiting = self._waiters.get(channel)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiters[channel]

    async def _run(self, ready: asyncio.Future[None]) -> None:
        pubsub = None
        try:
            pubsub = self._pubsub = self._client.pubsub()
            self.connections += 1
            await pubsub.psubscribe(_PATTERN)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                kind = _text(message.get("type"))
                if kind == "psubscribe" and not ready.done():
                    ready.set_result(None)
                elif kind == "pmessage":
                    self._deliver(_text(message["channel"]), message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # lost connection, no pub/sub: waiters poll meanwhile
            self._failed_until = time.monotonic() + _RETRY_AFTER
            if not ready.done():
                ready.set_exception(exc)
                ready.exception()  # seen here: a waiter may have given up on it
            self._wake_all()
        finally:
            self._pubsub = None
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _deliver(self, channel: str, data: Any) -> None:
        waiting = self._waiters.pop(channel, ())
        payload = data.encode() if isinstance(data, str) else bytes(data)
        for future in waiting:
            if not future.done():
                future.set_result(payload)

    def _wake_all(self) -> None:
        """Send every waiter back to reading the key: nothing will be pushed to them."""
        waiting, self._waiters = self._waiters, {}
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_result(b"")

    async def aclose(self) -> None:
        """Stop the reader and close its connection (on this loop only)."""
        task, self._task = self._task, None
        self._wake_all()
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def detach(self) -> Any:
        """In a forked child: forget the parent's connection without closing it (its
        socket is the parent's); returns it, to be kept referenced."""
        pubsub, self._pubsub, self._task = self._pubsub, None, None
        self._waiters = {}
        return pubsub


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
