"""The synchronous API: a thin facade over a ``TokenManager`` on one private event loop.

Django, Flask and Celery code has no event loop to await in. ``SyncTokenManager`` runs
the asynchronous manager on an event loop of its own, in a daemon thread that starts on
first need, and hands each slow call to it with ``asyncio.run_coroutine_threadsafe``.
Everything the async manager guarantees (one request per key however many callers, the
shared backend's lock, refresh ahead of expiry, the fleet back-off) holds, because there
is exactly one manager on exactly one loop; the calling threads only wait.

Why the warm path may read the hot tier from another thread: a hot entry is retired by
a timer on the manager's loop when its token enters the refresh window, and by the
manager's periodic wall-clock check. Here that loop runs all the time in its own thread,
whatever the calling threads do, so the timers fire on time and the hot tier never holds
a token past its refresh moment (which comes well before the safety margin). A sync
wrapper that ran the loop only during calls (``asyncio.run`` per call, say) would leave
the timers stopped between calls and serve an expired token from the hot tier: that is
the trap this design avoids. Reading a dict with ``dict.get`` while another thread
writes it is atomic under the GIL (and under the per-object locks of free-threaded
builds), and the hot dicts are never replaced, only updated, so a caller sees either the
old value, the new one, or a miss, never a torn one.

Fork safety (Celery's prefork pool, gunicorn, ``multiprocessing``): a forked child has
no copy of the loop's thread. After a fork the manager forgets its parent's loop,
connections and hot tier (``TokenManager``'s own after-fork hook), and this module
forgets the parent's thread and loop (``os.register_at_fork``, with a pid check on the
slow path as well), so the child's first call starts a thread and loop of its own. The
child's first call is always a slow one: its hot tier is empty after the fork.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import ConfigurationError, TokenError
from ._manager import TokenManager
from ._token import Token
from ._tuning import Tuning
from .backends import TokenBackend

if TYPE_CHECKING:
    from ._httpx_sync_auth import SyncTokenAuth
    from ._requests_auth import RequestsTokenAuth
    from ._settings import Settings

__all__ = ["SyncTokenManager"]

logger = logging.getLogger("cl_tokens")

_T = TypeVar("_T")

# Seconds close() waits for the manager to close and the loop's thread to end.
_CLOSE_TIMEOUT = 10.0


class SyncTokenManager:
    """A ``TokenManager`` for synchronous code: Django, Flask, Celery, scripts.

    ``manager.header()`` returns ``{"Authorization": "Bearer <token>"}``. While a token
    is cached it is a dict lookup in the calling thread (no lock, no thread hop); on a
    miss the call waits for the manager, which runs on a private event loop in a daemon
    thread started on first need. Any number of threads may share one instance: 64
    threads asking at once on a cold cache cause one token request. It is fork-safe:
    a child process (Celery prefork, gunicorn) starts its own loop on its first call.

    Use one instance per credential for the life of the process (a module-level object,
    or one built from Django settings), and ``close()`` it at exit, or use ``with``.
    Async code should use ``TokenManager`` itself: a call here blocks its thread.

    Args:
        client_id: the API credentials' client id.
        client_secret: the client secret (None for sales-channel credentials).
        **options: every other keyword argument of ``TokenManager`` (``scope``,
            ``auth_url``, ``backend``, ``backend_options``, ``encryption_key``,
            ``body_encoding``, ``clock`` and the ``Tuning`` options), except
            ``session``: the manager makes its own on its private loop.

    Raises:
        ConfigurationError: listing every invalid argument.
    """

    def __init__(self, client_id: str, client_secret: str | None = None, **options: Any) -> None:
        if options.get("session") is not None:
            raise ConfigurationError(
                "SyncTokenManager takes no session: its manager makes its own aiohttp "
                "session on the private event loop it runs on"
            )
        options.pop("session", None)
        manager = TokenManager(client_id, client_secret, **options)
        self._manager = manager
        self._state = _State(manager)
        # The warm path: bound lookups on the manager's hot dicts, which the manager
        # never replaces (it clears and fills them in place).
        self._hot_header = manager._hot_headers.get
        self._hot_token = manager._hot_tokens.get
        self._hot_customer = manager._hot_customers.get
        _LIVE.add(self._state)
        # Warns and cleans up if the instance is dropped without close(); not at
        # interpreter exit, when the daemon thread simply ends with the process.
        self._finalizer = weakref.finalize(self, _abandoned, self._state)
        self._finalizer.atexit = False

    # -- construction from settings --------------------------------------------------

    @classmethod
    def from_settings(
        cls, settings: Settings | Mapping[str, Any], **overrides: Any
    ) -> SyncTokenManager:
        """A manager from a ``Settings`` or a settings mapping (``Settings.from_mapping``),
        e.g. a dict in Django's settings module. ``overrides`` win over the settings."""
        from ._settings import Settings

        if not isinstance(settings, Settings):
            settings = Settings.from_mapping(settings)
        return cls(**{**settings.manager_kwargs(), **overrides})

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, prefix: str = "CL_", **overrides: Any
    ) -> SyncTokenManager:
        """A manager configured from environment variables (``CL_CLIENT_ID``, ...)."""
        from ._settings import Settings

        return cls.from_settings(Settings.from_env(environ, prefix=prefix), **overrides)

    # -- properties ------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self._manager.client_id

    @property
    def scope(self) -> str | None:
        """The default scope of calls that pass none."""
        return self._manager.scope

    @property
    def auth_url(self) -> str:
        return self._manager.auth_url

    @property
    def backend(self) -> TokenBackend:
        """The shared backend behind the in-process tier."""
        return self._manager.backend

    @property
    def tuning(self) -> Tuning:
        return self._manager.tuning

    @property
    def closed(self) -> bool:
        return self._state.closed

    def __repr__(self) -> str:
        manager = self._manager
        return (
            f"SyncTokenManager(client_id={manager.client_id!r}, scope={manager.scope!r}, "
            f"auth_url={manager.auth_url!r}, backend={manager.backend!r})"
        )

    # -- the calls -------------------------------------------------------------------

    def header(self, scope: str | None = None, *, customer: str | None = None) -> dict[str, str]:
        """``{"Authorization": "Bearer <token>"}``, a new dict on every call.

        Args:
            scope: overrides the manager's default scope for this call.
            customer: a customer's ``owner_id``: their token (see ``login``), not the
                app's own.

        Raises:
            AuthenticationError: the credentials were rejected.
            LoginRequiredError: (with ``customer``) nothing usable is cached for them.
            TokenEndpointError: no token could be had from the endpoint.
            ConfigurationError: ``scope`` is not a non-empty string or None.
            TokenError: the manager is closed.
        """
        try:
            if customer is None:
                value = self._hot_header(scope)
            elif scope is None:  # a customer's default-scope header is kept by owner id
                value = self._hot_customer(customer)
            else:
                value = self._hot_header((scope, customer))
        except TypeError:  # unhashable scope: let the slow path name the problem
            value = None
        if value is not None:
            return {"Authorization": value}
        return self._call(partial(self._manager.header, scope, customer=customer))

    def token(self, scope: str | None = None, *, customer: str | None = None) -> Token:
        """The current ``Token`` for ``scope`` (the manager's default when None), or
        for ``customer``."""
        try:
            token = self._hot_token(scope if customer is None else (scope, customer))
        except TypeError:
            token = None
        if token is not None:
            return token
        return self._call(partial(self._manager.token, scope, customer=customer))

    def invalidate(
        self, access_token: str, scope: str | None = None, *, customer: str | None = None
    ) -> bool:
        """Drop ``access_token`` from every tier, only if it is still the cached token.

        Call it when the API answers 401 ``INVALID_TOKEN`` (``requests_auth()`` and
        ``httpx_auth()`` do). Returns whether anything was dropped.
        """
        return self._call(partial(self._manager.invalidate, access_token, scope, customer=customer))

    def revoke(self, scope: str | None = None) -> bool:
        """Revoke the cached token for ``scope`` and drop it; False if none was cached."""
        return self._call(partial(self._manager.revoke, scope))

    # -- customers (see TokenManager.login and the README's "Customers") --------------

    def login(self, username: str, password_: str, *, scope: str | None = None) -> Token:
        """Log a customer in (password grant); ``header(customer=token.owner_id)``
        then serves their token and renews it ahead of expiry."""
        return self._call(partial(self._manager.login, username, password_, scope=scope))

    def login_as(
        self,
        owner_id: str,
        *,
        owner_type: str = "Customer",
        claims: Mapping[str, Any] | None = None,
        scope: str | None = None,
    ) -> Token:
        """Act for a customer authenticated elsewhere (JWT bearer grant)."""
        return self._call(
            partial(
                self._manager.login_as,
                owner_id,
                owner_type=owner_type,
                claims=claims,
                scope=scope,
            )
        )

    def exchange_code(self, code: str, redirect_uri: str, *, scope: str | None = None) -> Token:
        """Exchange an authorization code (webapps); the token is cached per owner."""
        return self._call(partial(self._manager.exchange_code, code, redirect_uri, scope=scope))

    def logout(self, customer: str, *, scope: str | None = None) -> bool:
        """Revoke a customer's tokens and drop them; False when nothing was cached."""
        return self._call(partial(self._manager.logout, customer, scope=scope))

    def requests_auth(
        self, *, scope: str | None = None, hosts: Iterable[str] = (), customer: str | None = None
    ) -> RequestsTokenAuth:
        """A ``requests.auth.AuthBase``: ``session.auth = manager.requests_auth()``.

        It adds the Authorization header to requests to Commerce Layer hosts and, on a
        401 from the API, invalidates exactly the token it sent and sends the request
        again once with a fresh one. Needs ``pip install 'cl-tokens[requests]'``.

        Args:
            scope: the scope of the tokens it sends (the manager's default when None).
            hosts: extra hosts that may receive the token (``api.example.com`` or
                ``*.example.com``), beyond https ``*.commercelayer.io`` and the
                auth_url's origin.
            customer: a customer's ``owner_id``: send their token (see ``login``).
        """
        from ._requests_auth import RequestsTokenAuth

        return RequestsTokenAuth(self, scope=scope, hosts=hosts, customer=customer)

    def httpx_auth(
        self, *, scope: str | None = None, hosts: Iterable[str] = (), customer: str | None = None
    ) -> SyncTokenAuth:
        """An ``httpx.Auth`` for ``httpx.Client``, with ``requests_auth()``'s behaviour.

        Needs ``pip install 'cl-tokens[httpx]'``. Arguments as for ``requests_auth``.
        """
        from ._httpx_sync_auth import SyncTokenAuth

        return SyncTokenAuth(self, scope=scope, hosts=hosts, customer=customer)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the manager (its session, and the backend it owns) and end the thread.

        Calls waiting at that moment raise ``TokenError``, and so does every later call.
        Idempotent.
        """
        state = self._state
        with state.lock:
            if state.closed:
                return
            if state.runner is not None and state.runner.is_current():
                raise TokenError(
                    "SyncTokenManager.close() called from its own event loop thread; "
                    "call it from the thread that uses the manager"
                )
            state.closed = True
            runner = state.runner
            state.runner = None
        self._finalizer.detach()
        if runner is None:  # never used: still close what the manager owns
            runner = _LoopThread()
        try:
            runner.shutdown(self._manager).result(_CLOSE_TIMEOUT)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            logger.warning("the token manager did not close within %g s", _CLOSE_TIMEOUT)
        finally:
            runner.join(_CLOSE_TIMEOUT)

    def __enter__(self) -> SyncTokenManager:
        if self._state.closed:
            raise TokenError("this SyncTokenManager is closed")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the slow path ---------------------------------------------------------------

    def _call(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``make()`` on the private loop and wait for its outcome."""
        future = self._state.submit(make)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise TokenError("the SyncTokenManager was closed while this call waited") from None


class _State:
    """What a ``SyncTokenManager`` holds beyond its warm path: its loop thread, the lock
    that starts it, and the pid it belongs to. Separate from the instance so that the
    finalizer and the after-fork hook can reach it without keeping the instance alive."""

    def __init__(self, manager: TokenManager) -> None:
        self.manager = manager
        self.lock = threading.Lock()
        self.runner: _LoopThread | None = None
        self.pid = os.getpid()
        self.closed = False

    def submit(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> concurrent.futures.Future[_T]:
        if self.pid != os.getpid():  # forked without the after-fork hook having run
            self.after_fork_in_child()
        runner = self.runner
        if runner is None:
            runner = self._start()
        if runner.is_current():
            raise TokenError(
                "a SyncTokenManager was called from its own event loop thread; "
                "code running there must use the async TokenManager"
            )
        future = runner.submit(make)
        if future is None:  # the loop stopped meanwhile: close() ran
            raise TokenError("this SyncTokenManager is closed")
        return future

    def _start(self) -> _LoopThread:
        with self.lock:
            if self.closed:
                raise TokenError("this SyncTokenManager is closed")
            if self.runner is None:
                self.runner = _LoopThread()
            return self.runner

    def after_fork_in_child(self) -> None:
        """Forget the parent's thread and loop; the child's next call starts its own."""
        if self.runner is not None:
            # Its loop is "running" in a thread that does not exist here: it can be
            # neither closed nor collected quietly. Kept, unused, for the child's life.
            _INHERITED.append(self.runner)
        self.runner = None
        self.lock = threading.Lock()  # may have been held by a thread of the parent
        self.pid = os.getpid()


class _LoopThread:
    """One event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._accepting = True
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="cl_tokens-sync-loop", daemon=True
        )
        self._thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            with self._lock:
                self._accepting = False
            try:
                # Run what was submitted before the stop (it creates its task now), then
                # end every task, as asyncio.run does: each waiting caller gets an outcome.
                loop.run_until_complete(asyncio.sleep(0))
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def is_current(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def submit(
        self, make: Callable[[], Coroutine[Any, Any, _T]]
    ) -> concurrent.futures.Future[_T] | None:
        """Schedule ``make()`` on the loop; None once the loop has stopped."""
        with self._lock:
            if not self._accepting:
                return None
            return asyncio.run_coroutine_threadsafe(make(), self.loop)

    def shutdown(self, manager: TokenManager) -> concurrent.futures.Future[None]:
        """Close ``manager`` on the loop, then stop the loop (the thread then ends)."""
        future = self.submit(partial(_close_and_stop, manager))
        if future is None:
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done
        return future

    def join(self, timeout: float) -> None:
        if not self.is_current():
            self._thread.join(timeout)


async def _close_and_stop(manager: TokenManager) -> None:
    try:
        await manager.aclose()
    finally:
        asyncio.get_running_loop().stop()


def _abandoned(state: _State) -> None:
    """A ``SyncTokenManager`` was collected without ``close()``."""
    if state.closed or state.runner is None or state.pid != os.getpid():
        return
    warnings.warn(
        f"unclosed SyncTokenManager for client {state.manager.client_id!r}: call close() "
        "or use 'with'",
        ResourceWarning,
        stacklevel=2,
    )
    state.closed = True
    runner, state.runner = state.runner, None
    runner.shutdown(state.manager)  # not waited for: this may run in any thread


_LIVE: weakref.WeakSet[_State] = weakref.WeakSet()
_INHERITED: list[_LoopThread] = []


def _after_fork_in_child() -> None:
    for state in list(_LIVE):
        state.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
