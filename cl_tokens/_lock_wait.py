"""How a manager waits for another process's fetch: ``get_or_lock``, then ``wait_for``
until the token is written, the lock comes free, or ``lock_wait`` runs out (a mixin of
``TokenManager``)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ._errors import BackendError
from ._metrics import metrics
from ._shared import UNAVAILABLE
from ._token import Token
from .backends import LockHandle, TokenBackend

if TYPE_CHECKING:
    from ._shared import SharedTier
    from ._tuning import Tuning

__all__ = ["LockWaiting"]

logger = logging.getLogger("cl_tokens")


class LockWaiting:
    """The lock-or-token step of ``TokenManager``'s cold path."""

    if TYPE_CHECKING:  # what it uses of the manager
        _shared: SharedTier
        _tuning: Tuning
        _rejected: dict[str, tuple[str, float]]

        def _acceptable(self, key: str, token: Token | None, stale: Token | None) -> bool: ...

    async def _lock_or_token(self, key: str, stale: Token | None) -> LockHandle | Token | None:
        """The backend's lock on ``key``, or a usable token stored there, or one that
        another process writes while we wait (pushed by backends that can).

        None means: fetch without the lock (the backend is down, or its lock holder
        took longer than ``lock_wait``).
        """
        tuning, shared = self._tuning, self._shared
        loop = asyncio.get_running_loop()
        deadline = loop.time() + tuning.effective_lock_wait
        # A backend that overrides wait_for is woken by the write or the release; with
        # the polling default, a release without a write is seen by the next get_or_lock.
        pushed = type(shared.backend).wait_for is not TokenBackend.wait_for
        # A backend that never suspends (memory) reads and locks with nothing between.
        composed = (
            type(shared.backend).get_or_lock is TokenBackend.get_or_lock
            and type(shared.backend).__dict__.get("blocking", True) is not False
        )
        slice_ = tuning.lock_lease if pushed else max(0.1, 10 * tuning.lock_poll_interval)
        # The token no stored copy may be: the one being refreshed, or one dropped here.
        refuse = stale.access_token if stale is not None else None
        rejected = self._rejected.get(key)
        if refuse is None and rejected is not None:
            refuse = rejected[0]
        missed = False
        while True:
            outcome = await shared.get_or_lock(key, tuning.lock_lease, tuning.longest_hold, refuse)
            in_two_steps = composed
            if isinstance(outcome, Token):
                if self._usable(key, outcome, stale):
                    return outcome
                # Stored but not for us (inside its margin, forged, rejected...): take
                # the lock, and wait for a token other than this one.
                refuse = outcome.access_token
                outcome = await shared.acquire(key, tuning.lock_lease, tuning.longest_hold)
                in_two_steps = True
            if not missed:
                missed = True
                metrics.cache_miss("shared")
            if outcome is UNAVAILABLE:
                return None
            if isinstance(outcome, LockHandle):
                if in_two_steps:
                    # The default get_or_lock reads, then locks: a holder may have
                    # written and released in between. Read again under the lock.
                    stored = await shared.read(key)
                    if stored is not None and self._acceptable(key, stored, stale):
                        await shared.release(outcome)
                        return stored
                return outcome
            left = deadline - loop.time()
            if left > 0:
                token = await shared.wait_for(
                    key, min(left, slice_), refuse, tuning.lock_poll_interval
                )
                if token is UNAVAILABLE:
                    return None
                if isinstance(token, Token):
                    if self._usable(key, token, stale):
                        return token
                    refuse = token.access_token
                if loop.time() < deadline:
                    continue
            waited = tuning.effective_lock_wait
            if tuning.strict:
                raise BackendError(
                    f"waited {waited:g} s for another process's token fetch; "
                    "neither the lock nor a token came"
                )
            logger.warning(
                "waited %.1f s for another process's token fetch; fetching directly", waited
            )
            return None

    def _usable(self, key: str, token: Token, stale: Token | None) -> bool:
        return self._shared.trusted(key, token) and self._acceptable(key, token, stale)
