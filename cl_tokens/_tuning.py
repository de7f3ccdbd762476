"""Tuning options, their defaults and validation, and the per-token timing they imply.

One place defines every knob, so the manager, ``Settings`` and the docs agree.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Any

from ._errors import ConfigurationError
from ._token import Token

__all__ = ["TokenTiming", "Tuning", "plan_token"]


@dataclass(frozen=True, kw_only=True)
class Tuning:
    """Every tuning option, with its default. All durations are in seconds.

    Attributes:
        safety_margin: never hand out a token with less than this left (clamped to 25%
            of the token's lifetime, so short-lived tokens still work).
        refresh_window: refresh ahead when this much is left (clamped to 50% of the
            lifetime). Keep it under 900 s for Commerce Layer, which issues a new token
            only in the last 15 minutes of the old one's life.
        refresh_jitter: start the refresh up to this much earlier, drawn once per token
            (clamped to 10% of the lifetime), so processes do not refresh in step.
        min_refresh_gap: wait at least this long (clamped to 10% of the lifetime) between
            refresh attempts after a failure or after the endpoint gave the same token.
        attempts: requests per fetch, the first included.
        backoff_base: backoff before the second attempt; it doubles each time.
        backoff_cap: the largest backoff.
        fetch_deadline: the overall time a fetch (all its attempts) may take.
        attempt_timeout: the time one request may take.
        auth_failure_cooldown: after the credentials are rejected, calls fail fast with
            the same error for this long instead of calling the endpoint again.
        throttle_cap: the longest back-off after a 429 or a fetch whose attempts all
            failed. The back-off doubles from ``backoff_base`` with each failed fetch up
            to this cap; a ``Retry-After`` sets it directly, clamped to the cap. It is
            written to the shared backend, so the whole fleet honours it.
        lock_lease: the lease of a shared-backend lock. The holder renews it every
            third of a lease while its fetch runs (at most ``fetch_deadline + 2 *
            backend_timeout``), so a lock orphaned by a killed holder or a Redis
            failover delays the others by one lease at most. At least
            ``2 * backend_timeout``, so a renewal has time to land.
        lock_wait: how long to wait for another process's fetch before fetching
            directly (None: ``fetch_deadline + 2 * backend_timeout + 1``).
        lock_poll_interval: how often a process waiting on another's fetch re-reads the
            shared backend.
        backend_timeout: the longest one call to the shared backend may take before it
            counts as a backend failure (a hung store must not hang callers).
        backend_retry_interval: after a shared backend fails, go around it this long
            before trying it again.
        clock_check_interval: how often cached tokens are checked against the wall clock
            (catches clock jumps and suspended processes the timers miss).
        hot_tier: serve warm calls from the hot tier, which loop timers retire at each
            token's refresh moment. Turn it off when the event loop does not run
            continuously (a synchronous wrapper that runs the loop only during calls):
            the first call after a stopped loop restarts runs before its overdue timers.
            Off, every call checks the clocks (about 1 µs instead of 0.15 µs).
        strict: raise ``BackendError`` when the shared backend fails, instead of
            warning once and carrying on without it.
        max_customers: the most customer tokens held in this process (least recently
            renewed or logged in first out); the shared backend keeps the rest.
        allow_plaintext_refresh_tokens: let a file or Redis backend without an
            ``encryption_key`` store customers' refresh tokens (credentials) in clear.
    """

    safety_margin: float = 30.0
    refresh_window: float = 600.0
    refresh_jitter: float = 60.0
    min_refresh_gap: float = 30.0
    attempts: int = 3
    backoff_base: float = 1.0
    backoff_cap: float = 10.0
    fetch_deadline: float = 30.0
    attempt_timeout: float = 10.0
    auth_failure_cooldown: float = 10.0
    throttle_cap: float = 60.0
    lock_lease: float = 6.0
    lock_wait: float | None = None
    lock_poll_interval: float = 0.01
    backend_timeout: float = 2.0
    backend_retry_interval: float = 1.0
    clock_check_interval: float = 1.0
    hot_tier: bool = True
    strict: bool = False
    max_customers: int = 10_000
    allow_plaintext_refresh_tokens: bool = False

    def __post_init__(self) -> None:
        problems = tuning_problems(self)
        if problems:
            raise ConfigurationError(
                "invalid tuning: " + "; ".join(f"{name}: {why}" for name, why in problems)
            )

    @property
    def longest_hold(self) -> float:
        """The longest a process may hold a backend lock: a read, the fetch, a write."""
        return self.fetch_deadline + 2 * self.backend_timeout

    @property
    def effective_lock_wait(self) -> float:
        """``lock_wait``, by default just past the longest a holder may legitimately take."""
        return self.longest_hold + 1.0 if self.lock_wait is None else self.lock_wait

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def tuning_problems(tuning: Tuning) -> list[tuple[str, str]]:
    """Every invalid option of ``tuning`` as (name, reason); empty when all are fine."""
    problems: list[tuple[str, str]] = []
    for f in fields(tuning):
        value = getattr(tuning, f.name)
        if f.name in ("strict", "hot_tier", "allow_plaintext_refresh_tokens"):
            if not isinstance(value, bool):
                problems.append((f.name, "must be true or false"))
        elif f.name in ("attempts", "max_customers"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append((f.name, "must be a whole number of at least 1"))
        elif f.name == "lock_wait" and value is None:
            continue
        elif not _is_number(value):
            problems.append((f.name, "must be a finite number of seconds"))
        elif f.name in ("safety_margin", "refresh_jitter", "backoff_base") and value < 0:
            problems.append((f.name, "must not be negative"))
        elif f.name not in ("safety_margin", "refresh_jitter", "backoff_base") and value <= 0:
            problems.append((f.name, "must be greater than 0"))
    if not problems and tuning.backoff_cap < tuning.backoff_base:
        problems.append(("backoff_cap", "must be at least backoff_base"))
    if not problems and tuning.lock_lease < 2 * tuning.backend_timeout:
        problems.append(
            (
                "lock_lease",
                f"must be at least 2 x backend_timeout ({2 * tuning.backend_timeout:g} s): "
                "the holder renews it every third of a lease",
            )
        )
    return problems


@dataclass(frozen=True, slots=True)
class TokenTiming:
    """The wall-clock moments that govern one cached token in this process."""

    usable_until: float  # expires_at - safety margin: never handed out after this
    refresh_at: float  # expires_at - refresh window - jitter: start a background refresh
    min_gap: float  # seconds between two refresh attempts of this token


def safety_margin(token: Token, tuning: Tuning) -> float:
    """The margin of ``token``: ``safety_margin``, clamped to 25% of its lifetime.

    A token whose lifetime is unknown (built by hand, stored by another writer) gets the
    full margin: clamping to a share of the time *left* would shrink it to nothing.
    """
    if token.lifetime <= 0:
        return tuning.safety_margin
    return min(tuning.safety_margin, 0.25 * token.lifetime)


def plan_token(token: Token, tuning: Tuning, now: float, rng: random.Random) -> TokenTiming:
    """Draw the timing of ``token``: margin, refresh moment (with jitter), minimum gap."""
    lifetime = token.lifetime
    if lifetime > 0:
        window = min(tuning.refresh_window, 0.5 * lifetime)
        jitter = rng.uniform(0.0, min(tuning.refresh_jitter, 0.1 * lifetime))
        gap = min(tuning.min_refresh_gap, 0.1 * lifetime)
    else:
        window = tuning.refresh_window
        jitter = rng.uniform(0.0, tuning.refresh_jitter)
        gap = tuning.min_refresh_gap
    usable_until = token.expires_at - safety_margin(token, tuning)
    return TokenTiming(
        usable_until=usable_until,
        # A window narrower than the margin must still retire the token from the hot
        # tier before the margin: the hot path checks nothing.
        refresh_at=min(token.expires_at - window - jitter, usable_until),
        min_gap=max(gap, 0.001),
    )
