"""The manager's view of its shared backend: fault policy in one place.

A backend that fails is, by default, an optimisation lost, not an outage: one warning,
then the manager goes around it for ``backend_retry_interval`` and tries it again, and
logs once more when it answers. With ``strict=True`` every fault raises BackendError.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from ._clock import Clock
from ._errors import BackendError
from ._http import safe_text
from ._keys import CredentialKeys
from ._metrics import metrics
from ._token import Token
from .backends import LockHandle, TokenBackend

__all__ = ["UNAVAILABLE", "SharedTier"]

logger = logging.getLogger("cl_tokens")
T = TypeVar("T")


if sys.version_info >= (3, 11):

    async def within(call: Awaitable[T], timeout: float) -> T:
        """``await call``, or ``asyncio.TimeoutError`` after ``timeout`` seconds.

        ``asyncio.timeout`` runs the call in the caller's task: no task, wait future and
        extra loop turns per backend call (about 0.1 ms each on the cold path here), and
        it counts cancellations (``uncancel``), so none is lost (CPython gh-86296 is
        ``wait_for``'s, before 3.12).
        """
        async with asyncio.timeout(timeout):
            return await call

else:  # pragma: no cover - Python 3.10

    async def within(call: Awaitable[T], timeout: float) -> T:
        """``await call``, or ``asyncio.TimeoutError`` after ``timeout`` seconds.

        Not ``asyncio.wait_for``: before Python 3.12 it can return the result and drop
        a cancellation that arrives in the same loop iteration (CPython gh-86296), and a
        lost cancellation would let a fetch outlive ``aclose()``. Waiting on a task with
        ``asyncio.wait`` lets a cancellation through always.
        """
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_retrieve)
            raise asyncio.TimeoutError
        return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # abandoned after a timeout: its error is not news


#: How many times ``backend_timeout`` the first connection on a loop may take.
CONNECT_ALLOWANCE = 5


class _ConnectTimeout(asyncio.TimeoutError):
    """The backend's first connection took longer than its allowance."""


class _Unavailable:
    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = _Unavailable()


class SharedTier:
    """Calls a backend, turning its faults into a warning (or BackendError when strict)."""

    def __init__(
        self,
        backend: TokenBackend,
        *,
        clock: Clock,
        strict: bool,
        timeout: float,
        retry_interval: float,
        keys: CredentialKeys,
        backoff_cap: float,
        sealed: bool = True,
    ) -> None:
        self.backend = backend
        # False for the manager's private memory:// store: nothing outside this process
        # can write it, so a MAC proves nothing, and the store keeps the very Token the
        # memory tier holds instead of a sealed copy (the token is in memory once).
        self._sealed = sealed
        self._keys = keys
        self._backoff_cap = backoff_cap
        self._forged: set[str] = set()  # keys already warned about: one warning each
        self._renewals: dict[LockHandle, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._rewrites: dict[str, asyncio.Task[None]] = {}
        self._clock = clock
        self._strict = strict
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._down_until: float | None = None  # monotonic; None while the backend is fine
        # The backend's first connection on a loop (a Cluster client reads the slot map
        # and the COMMAND table: seconds for a fleet starting at once on a loaded
        # machine) is allowed CONNECT_ALLOWANCE x the per-call timeout, once, shared by
        # every caller: counted against ``backend_timeout``, a cold fleet took the
        # slow start for an outage and each process fetched by itself.
        self._connected: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[None] | None = None

    @property
    def _direct(self) -> bool:
        # A backend that never blocks (the memory backend) is awaited directly: a task
        # and a timer per call cost more than the call. Only a class that says so
        # itself: a subclass may add I/O to an inherited ``blocking = False``. Read
        # each time: the backend may be swapped after construction.
        return type(self.backend).__dict__.get("blocking", True) is False

    @property
    def available(self) -> bool:
        return self._down_until is None or self._clock.monotonic() >= self._down_until

    def _bounded(self, call: Awaitable[T], timeout: float | None = None) -> Awaitable[T]:
        """``call`` bounded by ``timeout`` (default ``backend_timeout``), unless the
        backend never blocks."""
        return call if self._direct else within(call, timeout or self._timeout)

    async def _call(
        self, call: Awaitable[T], what: str, timeout: float | None = None
    ) -> T | _Unavailable:
        if not self.available:
            close = getattr(call, "close", None)
            if close is not None:
                close()  # never awaited: close the coroutine so Python does not warn
            return UNAVAILABLE
        try:
            if not self._direct:
                try:
                    await self._connect()
                except BaseException:
                    close = getattr(call, "close", None)
                    if close is not None:
                        close()
                    raise
            # A store that hangs (a blackholed host, a stuck filesystem) is a failed store.
            result = await self._bounded(call, timeout)
        except Exception as exc:
            metrics.backend_error()
            if isinstance(exc, _ConnectTimeout):
                reason = f"no connection within {CONNECT_ALLOWANCE * self._timeout:g} s"
            elif isinstance(exc, asyncio.TimeoutError):
                reason = f"no answer within {self._timeout:g} s"
            else:
                reason = type(exc).__name__
            error = (
                exc
                if isinstance(exc, BackendError)
                else BackendError(f"{type(self.backend).__name__} failed to {what}: {reason}")
            )
            if self._strict:
                if error is exc:
                    raise
                raise error from exc
            if self._down_until is None:
                logger.warning(
                    "shared token backend %r failed to %s (%s); carrying on with the "
                    "in-process cache and direct fetches until it answers again",
                    self.backend,
                    what,
                    # The store's own words (a Redis error reply, a path) may carry
                    # anything: escaped and cut short like a server's.
                    safe_text(exc) if isinstance(exc, BackendError) else reason,
                )
            self._down_until = self._clock.monotonic() + self._retry_interval
            return UNAVAILABLE
        if self._down_until is not None:
            logger.warning("shared token backend %r answers again", self.backend)
            self._down_until = None
        return result

    async def _connect(self) -> None:
        """Have the backend connect on this loop, once, under a single flight."""
        loop = asyncio.get_running_loop()
        if self._connected is loop:
            return
        task = self._connecting
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._connect_within())
            task.add_done_callback(_retrieve)
            self._connecting = task
        try:
            # Shielded: a caller that gives up does not cancel the others' connection.
            await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                # Failed: the next call, after the retry interval, tries again.
                self._connecting = None
                if not task.cancelled() and task.exception() is None:
                    self._connected = loop

    async def _connect_within(self) -> None:
        try:
            await within(self.backend.connect(), CONNECT_ALLOWANCE * self._timeout)
        except asyncio.TimeoutError:
            raise _ConnectTimeout from None

    async def read(self, key: str) -> Token | None:
        """The token stored under ``key``, if it carries this credential's MAC."""
        result = await self._call(self.backend.get(key), "read a token")
        if isinstance(result, _Unavailable) or result is None:
            return None
        return result if self.trusted(key, result) else None

    async def write(self, key: str, token: Token, *, retry: bool = True) -> bool:
        """Store ``token`` under ``key``, sealed with this credential's MAC; whether the
        backend took it.

        A failed write is retried in the background, unless ``retry`` is False or the
        token carries a refresh token: a customer's pair written late could overwrite a
        newer pair another process rotated meanwhile, and bring back a spent refresh
        token that would then be sent again.
        """
        sealed = replace(token, seal=self._keys.seal(key, token)) if self._sealed else token
        self._cancel_rewrite(key)
        result = await self._call(self.backend.set(key, sealed), "write a token")
        if not isinstance(result, _Unavailable):
            return True
        if retry and token.refresh_token is None:
            self._rewrite_later(key, sealed)
        return False

    def _rewrite_later(self, key: str, sealed: Token) -> None:
        # Lost to a failover or a blip: the other processes would each fetch.
        task = self._later(lambda: self.backend.set(key, sealed))
        self._rewrites[key] = task
        task.add_done_callback(
            lambda done: self._rewrites.pop(key) if self._rewrites.get(key) is done else None
        )

    def trusted(self, key: str, token: Token) -> bool:
        """Whether ``token``, read under ``key``, carries this credential's MAC (a
        warning, once per key, when it does not)."""
        if not self._sealed or self._keys.verify(key, token):
            self._forged.discard(key)
            return True
        if key not in self._forged:
            if len(self._forged) > 1024:
                self._forged.clear()
            self._forged.add(key)
            logger.warning(
                "shared token backend %r holds a value for this credential that "
                "does not carry its MAC (written without the client secret, or "
                "altered); ignoring it",
                self.backend,
            )
        return False

    async def get_or_lock(
        self, key: str, lease: float, hold: float, refuse: str | None
    ) -> Token | LockHandle | _Unavailable | None:
        """The stored token (check it with ``trusted``), else the lock on ``key`` (renewed
        as ``acquire`` does), else None: another process holds the lock."""
        outcome = await self._call(
            self.backend.get_or_lock(key, lease=lease, refuse=refuse), "read or lock a token"
        )
        if isinstance(outcome, LockHandle):
            self._keep(outcome, lease, hold)
        return outcome

    async def wait_for(
        self, key: str, timeout: float, refuse: str | None, poll: float
    ) -> Token | _Unavailable | None:
        """A token written under ``key`` (check it with ``trusted``) within ``timeout``
        seconds, or None: the time is up, or the holder released without writing."""
        return await self._call(
            self.backend.wait_for(key, timeout=timeout, refuse=refuse, poll=poll),
            "wait for a token",
            timeout + self._timeout,
        )

    async def write_and_release(self, key: str, token: Token, handle: LockHandle) -> None:
        """Store ``token`` under ``key`` sealed with this credential's MAC, release
        ``handle`` and wake the waiters, in one backend call. Like ``release``, the lock
        is never left behind: what failed is retried in the background."""
        if not self.available:
            await self.write(key, token)  # only schedules the retry of the write
            await self.release(handle)
            return
        sealed = replace(token, seal=self._keys.seal(key, token)) if self._sealed else token
        self._cancel_rewrite(key)
        self._stop_renewal(handle)
        try:
            result = await self._call(
                self.backend.set_and_release(key, sealed, handle), "write a token"
            )
        except asyncio.CancelledError:
            self._later(lambda: self.backend.release_lock(handle), first=0.0)
            raise
        except Exception:  # strict: the error is the caller's, the lock is not
            await self.release(handle)
            raise
        if isinstance(result, _Unavailable):
            if token.refresh_token is None:  # see write(): never a customer's pair
                self._rewrite_later(key, sealed)
            self._later(lambda: self.backend.release_lock(handle))

    def _cancel_rewrite(self, key: str) -> None:
        """A later write or delete of ``key`` supersedes a write still being retried: an
        invalidated token must never come back from a late retry."""
        task = self._rewrites.pop(key, None)
        if task is not None:
            task.cancel()

    async def backoff(self, key: str) -> float | None:
        """The shared back-off's ``retry_at`` for ``key`` (wall clock), or None.

        Clamped to ``backoff_cap`` from now: whoever can write the store must not be
        able to stop the fleet for longer than one back-off.
        """
        result = await self._call(self.backend.get_backoff(key), "read a back-off")
        if isinstance(result, _Unavailable) or result is None:
            return None
        now = self._clock.time()
        if not isinstance(result, float | int) or not result > now:
            return None
        return min(float(result), now + self._backoff_cap)

    async def set_backoff(self, key: str, retry_at: float) -> None:
        await self._call(self.backend.set_backoff(key, retry_at), "write a back-off")

    async def delete(self, key: str) -> bool:
        """Delete whatever ``key`` holds (a customer's logout)."""
        self._cancel_rewrite(key)
        result = await self._call(self.backend.delete(key), "delete a token")
        return False if isinstance(result, _Unavailable) else result

    async def delete_if(self, key: str, access_token: str) -> bool:
        self._cancel_rewrite(key)
        result = await self._call(self.backend.delete(key, access_token), "delete a token")
        return False if isinstance(result, _Unavailable) else result

    async def acquire(
        self, key: str, lease: float, hold: float
    ) -> LockHandle | _Unavailable | None:
        """Take the lock on ``key`` for ``lease`` seconds, renewed until released or
        until ``hold`` seconds have passed (the longest a holder may need it)."""
        handle = await self._call(self.backend.acquire_lock(key, lease=lease), "take a lock")
        if isinstance(handle, LockHandle):
            self._keep(handle, lease, hold)
        return handle

    def _keep(self, handle: LockHandle, lease: float, hold: float) -> None:
        task = asyncio.get_running_loop().create_task(self._renew(handle, lease, hold))
        self._renewals[handle] = task

    def _stop_renewal(self, handle: LockHandle) -> None:
        renewal = self._renewals.pop(handle, None)
        if renewal is not None:
            renewal.cancel()

    def holds(self, key: str) -> bool:
        """Whether this process holds the lock on ``key`` (taken, and not known lost)."""
        return any(h.key == key and not t.done() for h, t in self._renewals.items())

    async def _renew(self, handle: LockHandle, lease: float, hold: float) -> None:
        deadline = self._clock.monotonic() + hold
        while self._clock.monotonic() + lease / 3 < deadline:
            await asyncio.sleep(lease / 3)
            try:
                still_ours = await self._bounded(
                    self.backend.renew_lock(handle, lease=lease), lease / 3
                )
            except Exception as exc:  # a missed renewal: the next one may land
                logger.debug("renewing a backend lock failed: %s", type(exc).__name__)
                continue
            if not still_ours:
                logger.warning(
                    "shared token backend %r lost a lock while its fetch ran (a failover?); "
                    "another process may fetch too",
                    self.backend,
                )
                return

    async def release(self, handle: LockHandle) -> None:
        """Release a lock, whatever the backend's state: never skipped, never raising.

        Skipping it because an earlier call failed would leave the lock held for its
        lease (a file lock: until the process exits); raising from it would hide the
        error of the fetch it ends.
        """
        self._stop_renewal(handle)
        try:
            await self._bounded(self.backend.release_lock(handle))
        except Exception as exc:
            logger.warning(
                "shared token backend %r failed to release a lock (%s); retrying in the "
                "background, else it expires with its lease",
                self.backend,
                type(exc).__name__,
            )
            self._later(lambda: self.backend.release_lock(handle))

    def _later(
        self, call: Callable[[], Awaitable[object]], budget: float = 5.0, first: float = 0.1
    ) -> asyncio.Task[None]:
        """Retry ``call`` in the background for up to ``budget`` seconds, the first time
        after ``first`` seconds: a write or a release lost to a failover costs the fleet
        a wait or a fetch if never retried."""

        async def retry() -> None:
            end = self._clock.monotonic() + budget
            delay = first
            while self._clock.monotonic() + delay < end:
                await asyncio.sleep(delay)
                delay = max(delay, 0.1)
                try:
                    await self._bounded(call())
                except Exception:
                    delay = min(2 * delay, 1.0)
                    continue
                return

        task = asyncio.get_running_loop().create_task(retry())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
