"""Retrying a token request: bounded attempts, backoff with jitter, Retry-After, a deadline.

A small helper rather than tenacity or stamina: the loop must honour ``Retry-After``
(seconds or an HTTP date) in place of its own backoff, give up as soon as the server asks
for a wait past the fetch deadline, and read an injectable clock, and those three would
take about as much code around a retry library as this whole module.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import timezone
from typing import TypeVar

from ._clock import Clock
from ._errors import TokenEndpointError

__all__ = ["backoff_delay", "parse_retry_after", "with_retries"]

T = TypeVar("T")
logger = logging.getLogger("cl_tokens")


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """The wait after failed attempt number ``attempt`` (1-based), with equal jitter.

    ``min(cap, base * 2**(attempt-1))``, half of it fixed and half uniform random: never
    an immediate retry against an endpoint that is rate limited, yet retries of many
    clients still spread out.
    """
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            # RFC 9110 §5.6.7: every HTTP-date is GMT, the asctime form included.
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, when.timestamp() - now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return None  # not a valid delta-seconds: fall back to our own backoff
    return seconds


async def with_retries(
    attempt: Callable[[float], Awaitable[T]],
    *,
    attempts: int,
    attempt_timeout: float,
    deadline: float,
    base: float,
    cap: float,
    clock: Clock,
    rng: random.Random,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Call ``attempt(timeout)`` until it succeeds, fails for good, or time runs out.

    Only ``TokenEndpointError`` with ``retryable=True`` is retried; anything else
    (``AuthenticationError`` above all) propagates at once.
    """
    end = clock.monotonic() + deadline
    number = 1
    while True:
        remaining = end - clock.monotonic()
        try:
            return await attempt(max(0.001, min(attempt_timeout, remaining)))
        except TokenEndpointError as error:
            if not error.retryable or number >= attempts:
                raise
            if error.retry_after is not None:
                delay = error.retry_after
                if clock.monotonic() + delay > end:
                    raise TokenEndpointError(
                        f"{error} The server asks to retry after {delay:.0f} s, past the "
                        f"fetch deadline of {deadline:g} s: retry no earlier than that.",
                        status=error.status,
                        retry_after=delay,
                    ) from error
            else:
                delay = backoff_delay(number, base=base, cap=cap, rng=rng)
                if clock.monotonic() + delay >= end:
                    raise
            logger.info(
                "token request attempt %d of %d failed (%s); retrying in %.2f s",
                number,
                attempts,
                error,
                delay,
            )
            await sleep(delay)
            number += 1
