"""The fleet-wide back-off: after a 429, or a fetch whose attempts all failed, no token
request for that key before ``retry_at``, in this process or any other sharing the
backend (``retry_at`` is written there, with a TTL equal to the wait).

The wait is ``Retry-After`` when the server sent one (clamped to ``throttle_cap``), else
it doubles from ``backoff_base`` with each failed fetch up to ``throttle_cap``; a success
ends it. With one fetch at a time fleet-wide (the backend's lock) and at most
``attempts`` requests per fetch, a key's fleet stays under Commerce Layer's 30 a minute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ._clock import Clock
from ._errors import TokenEndpointError
from ._shared import SharedTier
from ._tuning import Tuning

__all__ = ["Throttle", "throttles"]

logger = logging.getLogger("cl_tokens")


@dataclass(slots=True)
class _Backoff:
    retry_at: float  # wall clock
    delay: float  # the last wait, doubled by the next failure
    cause: str
    status: int | None


def throttles(error: TokenEndpointError) -> bool:
    """Whether a failed fetch must hold back the fleet: a 429, or transient failures
    (5xx, timeouts, connection errors) that used up the attempts or the deadline."""
    return error.status == 429 or error.retryable or error.retry_after is not None


class Throttle:
    """Back-offs by cache key, shared through ``SharedTier``."""

    def __init__(self, tuning: Tuning, clock: Clock, shared: SharedTier) -> None:
        self._tuning = tuning
        self._clock = clock
        self._shared = shared
        self.backoffs: dict[str, _Backoff] = {}

    def raise_if_backing_off(self, key: str) -> None:
        """Raise ``TokenEndpointError`` (with ``retry_after``) while ``key`` backs off."""
        backoff = self.backoffs.get(key)
        if backoff is None:
            return
        left = backoff.retry_at - self._clock.time()
        if left <= 0:
            return
        raise TokenEndpointError(
            f"token requests for this credential are backing off after {backoff.cause}; "
            f"no request is sent for {left:.3g} s more",
            status=backoff.status,
            retry_after=left,
        )

    async def check_shared(self, key: str) -> None:
        """Raise if another process (or machine) set a back-off for ``key``."""
        retry_at = await self._shared.backoff(key)
        if retry_at is None:
            return
        known = self.backoffs.get(key)
        if known is None or known.retry_at < retry_at:
            delay = retry_at - self._clock.time()
            self.backoffs[key] = _Backoff(
                retry_at=retry_at,
                delay=max(delay, known.delay if known is not None else 0.0),
                cause="a failure seen by another process",
                status=None,
            )
        self.raise_if_backing_off(key)

    async def enter(self, key: str, error: TokenEndpointError) -> None:
        """Start (or lengthen) the back-off of ``key`` after ``error``; written to the
        shared backend before the caller releases its lock, so the next holder sees it."""
        tuning = self._tuning
        previous = self.backoffs.get(key)
        if error.retry_after is not None:
            delay = min(error.retry_after, tuning.throttle_cap)
        elif previous is not None:
            delay = min(tuning.throttle_cap, max(tuning.backoff_base, 2 * previous.delay))
        else:
            delay = min(tuning.throttle_cap, tuning.backoff_base)
        if delay <= 0:
            return
        retry_at = self._clock.time() + delay
        status = error.status
        cause = f"HTTP {status}" if status else "failed requests"
        self.backoffs[key] = _Backoff(retry_at, delay, cause, status)
        logger.warning(
            "token endpoint %s: no token request for this credential for %.3g s, "
            "in any process sharing the backend",
            "rate limited (HTTP 429)" if status == 429 else "failing",
            delay,
        )
        await self._shared.set_backoff(key, retry_at)

    def succeeded(self, key: str) -> None:
        self.backoffs.pop(key, None)

    def forget_ended(self, now: float) -> None:
        """Drop back-offs long over (kept one cap past their end, for the doubling)."""
        for key, backoff in list(self.backoffs.items()):
            if now >= backoff.retry_at + self._tuning.throttle_cap:
                del self.backoffs[key]
