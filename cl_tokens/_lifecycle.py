"""A manager's life around its event loop and process: the periodic clock check, the
reset of a forked child, and the validation of its arguments."""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import TYPE_CHECKING, Any

from ._endpoint import auth_url_problem

if TYPE_CHECKING:
    from ._manager import TokenManager

__all__ = [
    "INHERITED",
    "LIVE",
    "argument_problems",
    "check_clock",
    "forget_idle",
    "reset_after_fork",
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


def forget_idle(manager: TokenManager) -> None:
    """Drop per-key state whose token expired or whose error state ended, so memory
    is bounded by the live tokens, not by every scope ever asked for."""
    now = manager._clock.time()
    mono = manager._clock.monotonic()
    for key, (_, until) in list(manager._rejected.items()):
        if now >= until:
            del manager._rejected[key]
    manager._throttle.forget_ended(now)
    for key, (until_mono, _) in list(manager._cooldowns.items()):
        if mono >= until_mono:
            del manager._cooldowns[key]
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
