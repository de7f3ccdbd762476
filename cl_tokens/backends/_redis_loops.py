"""Which Redis client to use, on which event loop, in which process.

A redis-py client belongs to the event loop it first ran on, and its sockets to the
process that opened them. A client built from a URL is therefore one per event loop: a
second ``asyncio.run`` gets a fresh one, a loop in another thread gets its own, and the
clients of closed loops are dropped (their transports cannot be closed without their
loop; their sockets are closed when collected, with asyncio's ResourceWarning).

In a forked child every client of the parent is *detached*: kept, unused and never
closed, for the life of the child. Closing it, or letting it be collected, would
unregister the parent's sockets from the epoll instance the two processes share (the
parent would stop hearing from Redis), and a TLS close would end the parent's sessions.

An injected client is the caller's. On a new loop, or in a child, its connection pools
are emptied the same way (redis-py's pool attributes; best effort for a
``RedisCluster``); it refuses to serve two loops that run at once. Build the backend
from a URL for that, or inject one client per loop.

Before its first command on a loop, a client is prepared once, under single flight: a
``RedisCluster`` is initialized (a half-initialized one fails concurrent commands with
``AttributeError``), and a single-node client is checked not to have reached a Cluster
node (``INFO cluster``), which would answer MOVED for most keys.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .._errors import BackendError

__all__ = ["CLUSTER_HINT", "Bound", "LoopClients"]

CLUSTER_HINT = (
    "this Redis is a Cluster node: use a redis+cluster://host:port[,host:port...] URL "
    "(or rediss+cluster://), or inject a redis.asyncio.RedisCluster"
)

# Clients and connections a forked child inherited (see the module docstring).
_DETACHED: list[object] = []


class Script(Protocol):
    async def __call__(self, keys: list[str], args: list[Any]) -> Any: ...


@dataclass
class Bound:
    """A client in use on one event loop, with its registered scripts."""

    loop: asyncio.AbstractEventLoop
    client: Any
    scripts: dict[str, Script]
    cluster: bool = False
    ready: bool = False
    misfit: str | None = None
    init_task: asyncio.Future[None] | None = None
    limit: asyncio.Semaphore | None = None
    #: The pub/sub listener of push wake-ups (``_redis_push.Listener``), made at the
    #: first wait on this loop.
    listener: Any = None


class LoopClients:
    """The clients of one backend: one per event loop, none shared across fork.

    Args:
        injected: the caller's client, or None to build them.
        build: makes a new client (when not injected); called once now, so that bad
            options fail at construction.
        where: how messages name the backend (no secret in it).
        scripts: Lua scripts by name, registered on every client.
    """

    def __init__(
        self,
        *,
        injected: Any,
        build: Callable[[], Any] | None,
        where: str,
        scripts: Mapping[str, str],
    ) -> None:
        self._injected = injected
        self._build = build
        self._where = where
        self._scripts = scripts
        self._pid = os.getpid()
        self._bound: dict[int, Bound] = {}
        self._injected_loop: asyncio.AbstractEventLoop | None = None
        # A built client not yet tied to a loop.
        self._spare: Any = build() if build is not None else None
        self._last: Any = injected if injected is not None else self._spare

    def current(self) -> Any:
        """The client for the running loop (bound now if need be), or the last used."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._last
        return self.bind(loop).client

    async def use(self) -> Bound:
        """The client for the running loop, ready for concurrent commands."""
        loop = asyncio.get_running_loop()
        bound = self._bound.get(id(loop))
        if bound is None or self._pid != os.getpid():
            bound = self.bind(loop)
        # A RedisCluster that lost a node re-initializes on its next command: commands
        # started meanwhile would share a half-initialized client, so they wait on the
        # same single flight (redis-py's own flag; False when it has none). Commands
        # already in flight may still fail (AttributeError, wrapped as BackendError
        # like the ConnectionErrors around them) while the failover lasts.
        if not bound.ready or (bound.cluster and getattr(bound.client, "_initialize", False)):
            await self._prepare(bound)
        if bound.misfit is not None:
            raise BackendError(bound.misfit)
        return bound

    def bind(self, loop: asyncio.AbstractEventLoop) -> Bound:
        """The client for ``loop``, made or rebound if need be (not yet prepared)."""
        if self._pid != os.getpid():
            self._after_fork()
        bound = self._bound.get(id(loop))
        if bound is not None:
            return bound
        for key, each in list(self._bound.items()):  # a copy: another thread may bind
            if each.loop.is_closed():
                self._bound.pop(key, None)
        if self._injected is not None:
            client = self._injected
            self._rebind_injected(loop)
        elif self._spare is not None:
            client, self._spare = self._spare, None
        else:
            assert self._build is not None  # noqa: S101 - not injected means built (for mypy)
            client = self._build()
        scripts = {name: client.register_script(lua) for name, lua in self._scripts.items()}
        from redis.asyncio import RedisCluster

        cluster = isinstance(client, RedisCluster)
        bound = Bound(loop=loop, client=client, scripts=scripts, cluster=cluster)
        connections = _max_connections(client)
        if connections is not None:
            bound.limit = asyncio.Semaphore(connections)
        self._bound[id(loop)] = bound
        self._last = client
        return bound

    def _after_fork(self) -> None:
        self._pid = os.getpid()
        for each in list(self._bound.values()):
            _DETACHED.append(each.client)
            if each.listener is not None:
                _DETACHED.append(each.listener.detach())
        if self._spare is not None:
            _DETACHED.append(self._spare)
            self._spare = None
        self._bound.clear()
        if self._injected is not None:
            _drop_connections(self._injected, keep=True)
            self._injected_loop = None

    def _rebind_injected(self, loop: asyncio.AbstractEventLoop) -> None:
        previous, self._injected_loop = self._injected_loop, loop
        if previous is None or previous is loop:
            return
        if previous.is_running() and not previous.is_closed():
            self._injected_loop = previous
            raise BackendError(
                f"RedisBackend({self._where}) is in use on another running event "
                "loop: an injected client serves one loop at a time; build the "
                "backend from a URL, or give each loop its own client"
            )
        # Its connections belong to the other loop: they would fail on this one.
        self._bound.clear()
        _drop_connections(self._injected, keep=False)

    async def _prepare(self, bound: Bound) -> None:
        """Wait for the one preparation of ``bound`` under way, or start it. It runs as
        a task of its own: a caller that times out or is cancelled leaves it running
        for the others, so a slow start (a Cluster's COMMAND table takes 0.2 s, and
        seconds on a loaded machine) is paid once, never restarted from scratch."""
        task = bound.init_task
        if task is None or task.done():
            # None: the first time; done: it failed, or the Cluster asks to start over.
            task = bound.init_task = asyncio.ensure_future(self._initialize(bound))
            task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def _initialize(self, bound: Bound) -> None:
        client = bound.client
        if bound.cluster:
            await client.initialize()  # returns at once if it already is
        elif not bound.ready:
            from redis.exceptions import ResponseError

            try:
                info = await client.info("cluster")
            except ResponseError:
                info = {}  # INFO renamed or denied: MOVED replies still tell
            if str(info.get("cluster_enabled", 0)) == "1":
                bound.misfit = f"RedisBackend({self._where}): {CLUSTER_HINT}"
        bound.ready = True

    async def aclose(self) -> None:
        """Close the built clients: on this loop, awaited; on another loop that runs,
        scheduled there; of a closed loop, dropped; in a forked child, detached. An
        injected client is left open."""
        bound, self._bound = list(self._bound.values()), {}
        spare, self._spare = self._spare, None
        if self._pid != os.getpid():
            _DETACHED.extend(b.client for b in bound)
            _DETACHED.extend(b.listener.detach() for b in bound if b.listener is not None)
            return
        loop = asyncio.get_running_loop()
        # The listeners are ours even on an injected client: their connections too.
        for each in bound:
            if each.listener is None:
                continue
            if each.loop is loop:
                await each.listener.aclose()
            elif each.loop.is_running():
                asyncio.run_coroutine_threadsafe(each.listener.aclose(), each.loop)
        if self._injected is not None:
            return
        for each in bound:
            if each.loop is loop:
                await _close(each.client)
            elif each.loop.is_running():
                asyncio.run_coroutine_threadsafe(_close(each.client), each.loop)
        if spare is not None:
            await _close(spare)


def _max_connections(client: Any) -> int | None:
    """How many connections the client may open (to each Cluster node), if it says."""
    if hasattr(client, "nodes_manager"):
        kwargs = getattr(client.nodes_manager, "connection_kwargs", {})
        limit = kwargs.get("max_connections")
    else:
        limit = getattr(getattr(client, "connection_pool", None), "max_connections", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return None


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a preparation's failure as seen: its callers may all have given up."""
    if not task.cancelled():
        task.exception()


async def _close(client: Any) -> None:
    """Close a built client, and for a Sentinel one its connections to the Sentinels."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def _drop_connections(client: Any, *, keep: bool) -> None:
    """Empty an injected client's connection pools without closing a connection.

    ``keep`` (in a forked child) keeps the dropped connections referenced for the life
    of the process, so that collecting them never touches the parent's sockets. The
    pool attributes are redis-py's; a client without them is left as it is.
    """
    pools: list[Any] = []
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pools.append(pool)
        manager = getattr(pool, "sentinel_manager", None)
        pools += [s.connection_pool for s in getattr(manager, "sentinels", ())]
    for pool in pools:
        if keep:
            _DETACHED.append(list(getattr(pool, "_available_connections", ())))
            _DETACHED.append(list(getattr(pool, "_in_use_connections", ())))
        pool.reset()
    get_nodes = getattr(client, "get_nodes", None)
    if get_nodes is not None:  # RedisCluster: each node keeps its own connections
        for node in get_nodes():
            connections = getattr(node, "_connections", None)
            free = getattr(node, "_free", None)
            if connections is None or free is None:
                continue
            if keep:
                _DETACHED.append(list(connections))
            connections.clear()
            free.clear()
