"""Tuning: validation, and the timing each token gets from it."""

from __future__ import annotations

import random

import pytest

from cl_tokens import ConfigurationError, Token, Tuning
from cl_tokens._tuning import plan_token, safety_margin

NOW = 1_700_000_000.0


def _token(lifetime: float, left: float | None = None) -> Token:
    return Token(
        "a.b.c",
        "Bearer",
        None,
        expires_at=NOW + (lifetime if left is None else left),
        lifetime=lifetime,
    )


def test_defaults_follow_commerce_layers_token_life() -> None:
    timing = plan_token(_token(7200), Tuning(), NOW, random.Random(3))
    assert timing.usable_until == NOW + 7200 - 30
    # 600 s window, up to 60 s jitter: inside the last 15 minutes, where CL reissues.
    assert NOW + 7200 - 660 <= timing.refresh_at <= NOW + 7200 - 600
    assert timing.min_gap == 30


def test_short_lived_tokens_get_clamped_windows() -> None:
    timing = plan_token(_token(8), Tuning(), NOW, random.Random(3))
    assert timing.usable_until == NOW + 8 - 2  # 25% of the lifetime
    assert NOW + 8 - 4 - 0.8 <= timing.refresh_at <= NOW + 8 - 4  # 50%, jitter ≤ 10%
    assert timing.min_gap == pytest.approx(0.8)


def test_a_window_narrower_than_the_margin_still_retires_before_the_margin() -> None:
    tuning = Tuning(safety_margin=120, refresh_window=30, refresh_jitter=0)
    timing = plan_token(_token(7200), tuning, NOW, random.Random(3))
    assert timing.refresh_at <= timing.usable_until == NOW + 7200 - 120


def test_a_token_of_unknown_lifetime_gets_the_full_margin() -> None:
    token = _token(0, left=10)  # built by hand: lifetime unknown, 10 s left
    assert safety_margin(token, Tuning()) == 30
    timing = plan_token(token, Tuning(), NOW, random.Random(3))
    assert timing.usable_until < NOW  # not usable: less than the margin is left


def test_a_lock_lease_too_short_to_renew_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="lock_lease"):
        Tuning(lock_lease=3, backend_timeout=2)  # renewed every 1 s, each may take 2 s
    # A short lease is fine: the holder renews it; waiters wait for the whole fetch.
    assert Tuning(lock_lease=4, fetch_deadline=30).effective_lock_wait == 35


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("safety_margin", -1),
        ("refresh_window", 0),
        ("attempts", 0),
        ("attempts", 1.5),
        ("attempt_timeout", float("nan")),
        ("backend_timeout", 0),
        ("strict", "yes"),
        ("hot_tier", 1),
    ],
)
def test_each_invalid_option_is_named(name: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Tuning(**{name: value})  # type: ignore[arg-type]
