"""A manager's life around its event loop and process: binding to a loop, the periodic
clock check, the reset of a forked child, and the validation of its arguments."""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from ._endpoint import auth_url_problem
from ._errors import ConfigurationError, TokenError
from ._http import check_session
from .backends import TokenBackend

if TYPE_CHECKING:
    from ._manager import TokenManager

__all__ = [
    "INHERITED",
    "LIVE",
    "argument_problems",
    "backend_problems",
    "bind_loop",
    "check_clock",
    "forget_idle",
    "reset_after_fork",
    "time_left",
    "warn_unclosed",
]


async def check_clock(
    manager_ref: weakref.ref[TokenManager], loop: asyncio.AbstractEventLoop, interval: float
) -> None:
    """Retire hot entries that the clocks say are due, whatever the timers did, and
    forget per-key state that ended."""
    try:
        while True:
            await asyncio.sleep(interval)
            manager = manager_ref()
            if manager is None:
                return
            manager._tier.sweep()
            manager._forget_idle()
            del manager
    except GeneratorExit:
        # Closed without being cancelled: its loop was closed under it. Nothing can
        # be awaited any more; the hot tier must not outlive the loop's timers.
        # (Closed late, by the garbage collector, after the manager moved on to a
        # new loop: then the state is the new loop's, and is left alone.)
        manager = manager_ref()
        if manager is None or loop is not manager._loop:
            raise
        manager._tier.clear_hot()
        if manager._own_session is not None:
            manager._own_session.detach()
            manager._own_session = None
        raise
    except asyncio.CancelledError:
        # The loop is ending (or the manager closing): same, and close the session's
        # connections while the loop can still run the closing.
        manager = manager_ref()
        if manager is not None:
            manager._tier.clear_hot()
            session, manager._own_session = manager._own_session, None
            del manager
            if session is not None:
                await session.close()
        raise


LIVE: weakref.WeakSet[TokenManager] = weakref.WeakSet()
INHERITED: list[object] = []


def _after_fork_in_child() -> None:
    for manager in list(LIVE):
        manager._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def argument_problems(
    client_id: object,
    client_secret: object,
    scope: object,
    auth_url: object,
    body_encoding: object,
) -> list[str]:
    problems = []
    if not isinstance(client_id, str) or not client_id.strip():
        problems.append("client_id must be a non-empty string")
    if client_secret is not None and (not isinstance(client_secret, str) or not client_secret):
        problems.append("client_secret must be a non-empty string or None")
    if scope is not None and (not isinstance(scope, str) or not scope.strip()):
        problems.append("scope must be a non-empty string such as 'market:code:europe', or None")
    url_problem = auth_url_problem(auth_url)
    if url_problem:
        problems.append(f"auth_url {url_problem}")
    if body_encoding not in ("json", "form"):
        problems.append(f"body_encoding must be 'json' or 'form', not {body_encoding!r}")
    return problems


def backend_problems(
    problems: list[str],
    backend: object,
    backend_options: Mapping[str, Any] | None,
    encryption_key: object,
    session: object,
) -> dict[str, Any]:
    """Add the problems of the backend and session arguments to ``problems``; return
    the options to build a backend from a URL with."""
    options = dict(backend_options or {})
    if backend is not None and not isinstance(backend, (str, TokenBackend)):
        problems.append("backend must be a URL string or a TokenBackend instance")
    if encryption_key is not None:
        if not isinstance(backend, str):
            problems.append(
                "encryption_key applies to a backend built from a URL "
                "(file:// or redis://); configure a TokenBackend instance itself"
            )
        elif "encryption_key" in options:
            problems.append("encryption_key is given twice (also in backend_options)")
        else:
            options["encryption_key"] = encryption_key
    if session is not None and not isinstance(session, aiohttp.ClientSession):
        problems.append("session must be an aiohttp.ClientSession")
    elif session is not None:
        try:
            check_session(session)
        except ConfigurationError as exc:
            problems.append(str(exc))
    return options


def forget_idle(manager: TokenManager) -> None:
    """Drop per-key state whose token expired or whose error state ended, so memory
    is bounded by the live tokens, not by every scope ever asked for."""
    now = manager._clock.time()
    mono = manager._clock.monotonic()
    for key, (_, until) in list(manager._rejected.items()):
        if now >= until:
            del manager._rejected[key]
    manager._throttle.forget_ended(now)
    manager._cooldowns.forget_ended(mono)
    manager._forget_spent_pairs(now)
    live = {
        key
        for key in manager._tier.keys()
        | manager._pairs.keys()
        | manager._rejected.keys()
        | manager._throttle.backoffs.keys()
        | manager._cooldowns.keys()
    }
    for scope_arg, (key, _) in list(manager._keys.items()):
        if key not in live and not manager._flights.in_flight(key):
            del manager._keys[scope_arg]
    manager._tier.forget_idle_pending(manager._flights.in_flight)


def reset_after_fork(manager: TokenManager) -> None:
    """Forget what belongs to the parent: its loop, tasks, connections and the hot
    tier, which no timer of this process would retire. The memory tier stays: every
    read of it is checked against the clocks."""
    manager._tier.clear_hot()
    manager._tier.cancel_timers()
    manager._flights.forget()
    if manager._keeper is not None:
        manager._keeper._log_destroy_pending = False  # type: ignore[attr-defined]
    manager._keeper = None
    manager._loop = None
    if manager._own_session is not None:
        # The parent's sockets: not ours to close, nor to let aiohttp's finalizers
        # report as unclosed in this process. Kept, unused, for the child's life.
        INHERITED.append(manager._own_session.connector)
        manager._own_session.detach()
        manager._own_session = None


def warn_unclosed(manager: TokenManager, warn: Any) -> None:
    """A manager collected without ``aclose()``: say so, as aiohttp does for a session,
    and end its clock check (which holds it only weakly)."""
    if getattr(manager, "_closed", True) or getattr(manager, "_loop", None) is None:
        return
    warn(
        f"unclosed TokenManager for client {manager._client_id!r}: call aclose() or "
        "use 'async with'",
        ResourceWarning,
        source=manager,
    )
    keeper = manager._keeper
    if keeper is not None and not keeper.done():
        loop = keeper.get_loop()
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(keeper.cancel)
            except RuntimeError:
                pass


def bind_loop(manager: TokenManager) -> None:
    """Bind ``manager`` to the running loop: refuse a second running loop, adopt a new
    one after the old one finished, and keep the clock-check task running."""
    loop = asyncio.get_running_loop()
    if loop is not manager._loop:
        old = manager._loop
        if old is not None and not old.is_closed() and old.is_running():
            raise TokenError(
                "this TokenManager is in use by another running event loop; "
                "create one manager per event loop (thread)"
            )
        _move_to(manager, loop)
    if manager._keeper is None or manager._keeper.done():
        # The task holds the manager weakly: a manager dropped without aclose() can
        # be collected (and says so with a ResourceWarning), ending this task.
        manager._keeper = loop.create_task(
            check_clock(weakref.ref(manager), loop, manager._tuning.clock_check_interval),
            name="cl_tokens clock check",
        )


def _move_to(manager: TokenManager, loop: asyncio.AbstractEventLoop) -> None:
    """Adopt a new event loop after the old one finished: drop what belonged to it."""
    manager._tier.clear_hot()
    manager._tier.rearm(loop)
    manager._flights.forget()
    if manager._keeper is not None and not manager._keeper.done():
        # Its loop was closed under it: asyncio would report it "destroyed but
        # pending" at collection, about a task the user never made.
        manager._keeper._log_destroy_pending = False  # type: ignore[attr-defined]
    manager._keeper = None
    if manager._own_session is not None:
        # Its connections belong to the old loop; they cannot be closed from here.
        manager._own_session.detach()
        manager._own_session = None
    manager._loop = loop


def time_left(
    manager_ref: weakref.ref[TokenManager],
) -> list[tuple[float, dict[str, str]]] | None:
    """The metrics gauge's view of one manager: seconds left per cached token."""
    manager = manager_ref()
    if manager is None:
        return None
    now = manager._clock.time()
    return [
        (
            token.expires_at - now,
            {"scope": token.scope or "", "kind": "customer" if token.owner_id else "app"},
        )
        for token in manager._tier.tokens_held()
    ]
