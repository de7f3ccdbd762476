"""Unit tests of the retry helpers: backoff bounds, Retry-After parsing, the retry loop."""

from __future__ import annotations

import email.utils
import random
from collections.abc import Callable

import pytest
from fakeclock import FakeClock

from cl_tokens import AuthenticationError, TokenEndpointError
from cl_tokens._retry import backoff_delay, parse_retry_after, with_retries

# -- backoff_delay ----------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 8, 20])
@pytest.mark.parametrize(("base", "cap"), [(1.0, 10.0), (0.01, 0.5), (0.25, 0.25)])
def test_backoff_delay_stays_within_equal_jitter_bounds(
    attempt: int, base: float, cap: float
) -> None:
    ceiling = min(cap, base * 2 ** (attempt - 1))
    rng = random.Random(attempt * 1000 + int(base * 100))
    delays = [backoff_delay(attempt, base=base, cap=cap, rng=rng) for _ in range(2000)]
    # Equal jitter: half fixed, half random. Never an immediate retry, never over the cap.
    assert min(delays) >= ceiling / 2
    assert max(delays) <= ceiling
    assert max(delays) <= cap
    # And the jitter really spreads the retries out over the upper half.
    assert max(delays) - min(delays) > ceiling * 0.4


def test_backoff_delay_doubles_until_the_cap() -> None:
    rng = random.Random(7)
    means = [
        sum(backoff_delay(n, base=1.0, cap=10.0, rng=rng) for _ in range(4000)) / 4000
        for n in range(1, 7)
    ]
    # Equal jitter has mean 3/4 of the ceiling: 0.75, 1.5, 3, 6, then capped at 7.5.
    for mean, expected in zip(means, [0.75, 1.5, 3.0, 6.0, 7.5, 7.5], strict=True):
        assert mean == pytest.approx(expected, rel=0.05)


def test_backoff_delay_with_zero_base_is_zero() -> None:
    assert backoff_delay(3, base=0.0, cap=10.0, rng=random.Random(1)) == 0.0


# -- parse_retry_after --------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
    ],
)
def test_parse_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_http_date_in_the_future() -> None:
    value = email.utils.formatdate(NOW + 42, usegmt=True)  # "Tue, 14 Nov 2023 22:14:02 GMT"
    assert value.endswith("GMT")
    assert parse_retry_after(value, NOW) == pytest.approx(42.0)


def test_parse_retry_after_http_date_depends_on_now() -> None:
    value = email.utils.formatdate(NOW + 100, usegmt=True)
    assert parse_retry_after(value, NOW + 60) == pytest.approx(40.0)


# RFC 9110 section 5.6.7: "A recipient that parses a timestamp value in an HTTP field MUST
# accept all three HTTP-date formats", and every one of them is in GMT.
RFC_9110_MOMENT = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Sun, 06 Nov 1994 08:49:37 GMT", id="imf-fixdate"),
        pytest.param("Sunday, 06-Nov-94 08:49:37 GMT", id="rfc850"),
        pytest.param("Sun, 06 Nov 1994 08:49:37 +0000", id="numeric-zone"),
        pytest.param("Sun Nov  6 08:49:37 1994", id="asctime"),
    ],
)
def test_parse_retry_after_every_http_date_format(value: str) -> None:
    assert parse_retry_after(value, RFC_9110_MOMENT - 10) == pytest.approx(10.0)


def test_parse_retry_after_http_date_in_the_past_means_now() -> None:
    value = email.utils.formatdate(NOW - 3600, usegmt=True)
    assert parse_retry_after(value, NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "12abc",
        "1,5",
        "Wed, 99 Foo 2015 07:28:00 GMT",
        "nan",
        "inf",
        "-inf",
    ],
)
def test_parse_retry_after_garbage_is_ignored(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("value", ["-1", "-30", "-0.5"])
def test_parse_retry_after_negative_never_gives_a_negative_wait(value: str) -> None:
    # A negative delta is not valid HTTP; whatever the parser makes of it, the retry
    # loop must not be handed a negative sleep (None: use the computed backoff; 0: now).
    result = parse_retry_after(value, NOW)
    assert result is None or result == 0.0


# -- with_retries -------------------------------------------------------------------------


class Script:
    """An ``attempt`` callable that plays a list of outcomes, recording its timeouts."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.timeouts: list[float] = []

    async def __call__(self, timeout: float) -> str:
        self.timeouts.append(timeout)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return str(outcome)

    @property
    def calls(self) -> int:
        return len(self.timeouts)


def recording_sleep(clock: FakeClock) -> tuple[list[float], Callable[[float], object]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        assert seconds >= 0
        slept.append(seconds)
        clock.advance(seconds)

    return slept, sleep


def transient(status: int | None = 503, retry_after: float | None = None) -> TokenEndpointError:
    return TokenEndpointError(
        f"transient {status}", status=status, retry_after=retry_after, retryable=True
    )


async def run(
    script: Script,
    clock: FakeClock,
    sleep: Callable[[float], object],
    **overrides: object,
) -> str:
    options: dict[str, object] = {
        "attempts": 3,
        "attempt_timeout": 10.0,
        "deadline": 30.0,
        "base": 1.0,
        "cap": 10.0,
        "clock": clock,
        "rng": random.Random(3),
        "sleep": sleep,
    }
    options.update(overrides)
    return await with_retries(script, **options)  # type: ignore[arg-type]


async def test_with_retries_succeeds_after_two_transient_failures() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    script = Script(transient(503), transient(502), "token")
    assert await run(script, clock, sleep) == "token"
    assert script.calls == 3
    assert len(slept) == 2
    # Backoff before attempt 2 is in [0.5, 1], before attempt 3 in [1, 2] (base 1 s).
    assert 0.5 <= slept[0] <= 1.0
    assert 1.0 <= slept[1] <= 2.0


async def test_with_retries_gives_up_after_the_attempts() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    last = transient(504)
    script = Script(transient(503), transient(500), last, "never reached")
    with pytest.raises(TokenEndpointError) as caught:
        await run(script, clock, sleep)
    assert caught.value is last
    assert script.calls == 3  # "attempts" counts every request, the first included
    assert len(slept) == 2  # no sleep after the last attempt


async def test_with_retries_one_attempt_means_no_retry() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    script = Script(transient(503), "token")
    with pytest.raises(TokenEndpointError):
        await run(script, clock, sleep, attempts=1)
    assert script.calls == 1
    assert slept == []


async def test_with_retries_does_not_retry_a_non_retryable_error() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    malformed = TokenEndpointError("malformed", status=200)
    script = Script(malformed, "token")
    with pytest.raises(TokenEndpointError) as caught:
        await run(script, clock, sleep)
    assert caught.value is malformed
    assert script.calls == 1
    assert slept == []


async def test_with_retries_does_not_retry_authentication_errors() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    rejected = AuthenticationError("rejected", status=401, code="UNAUTHORIZED")
    script = Script(rejected, "token")
    with pytest.raises(AuthenticationError) as caught:
        await run(script, clock, sleep)
    assert caught.value is rejected
    assert script.calls == 1
    assert slept == []


async def test_with_retries_lets_foreign_exceptions_through() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    script = Script(RuntimeError("bug"), "token")
    with pytest.raises(RuntimeError):
        await run(script, clock, sleep)
    assert script.calls == 1
    assert slept == []


async def test_with_retries_retry_after_replaces_the_backoff() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    script = Script(transient(429, retry_after=7.0), transient(503, retry_after=0.0), "token")
    assert await run(script, clock, sleep) == "token"
    assert slept == [7.0, 0.0]


async def test_with_retries_retry_after_past_the_deadline_fails_at_once() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    script = Script(transient(429, retry_after=120.0), "token")
    with pytest.raises(TokenEndpointError) as caught:
        await run(script, clock, sleep, deadline=30.0)
    assert slept == []  # no waiting for a retry that could not happen in time
    assert script.calls == 1
    error = caught.value
    assert error.status == 429
    assert error.retry_after == 120.0
    message = str(error)
    assert "120" in message
    assert "retry" in message.lower()
    assert "deadline" in message.lower()


async def test_with_retries_retry_after_counts_time_already_spent() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    # 20 s of waiting fits in a 30 s deadline, but not after 15 s have gone by.
    script = Script(transient(429, retry_after=15.0), transient(429, retry_after=20.0), "token")
    with pytest.raises(TokenEndpointError, match="20"):
        await run(script, clock, sleep, deadline=30.0)
    assert slept == [15.0]
    assert script.calls == 2


async def test_with_retries_stops_when_the_backoff_would_pass_the_deadline() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    last = transient(503)
    script = Script(last, "token")
    # The backoff after attempt 1 is at least 5 s (base 10, equal jitter); the deadline is 3 s.
    with pytest.raises(TokenEndpointError) as caught:
        await run(script, clock, sleep, base=10.0, cap=10.0, deadline=3.0)
    assert caught.value is last
    assert slept == []
    assert script.calls == 1


async def test_with_retries_attempt_timeout_is_bounded_by_the_deadline() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)

    class SlowScript(Script):
        async def __call__(self, timeout: float) -> str:
            clock.advance(timeout)  # the attempt uses its whole timeout, then times out
            return await super().__call__(timeout)

    script = SlowScript(transient(None), transient(None), transient(None), "token")
    with pytest.raises(TokenEndpointError):
        await run(
            script, clock, sleep, attempts=5, attempt_timeout=10.0, deadline=25.0, base=0.5, cap=0.5
        )
    # 10 s, then 10 s (after a backoff of <= 0.5 s), then what is left of the 25 s.
    assert script.timeouts[0] == 10.0
    assert script.timeouts[1] == 10.0
    assert script.timeouts[2] == pytest.approx(25.0 - 20.0 - sum(slept[:2]))
    assert script.timeouts[2] < 5.0
    assert sum(script.timeouts) + sum(slept) <= 25.0 + 1e-9


async def test_with_retries_backoff_grows_between_attempts() -> None:
    clock = FakeClock()
    slept, sleep = recording_sleep(clock)
    script = Script(*[transient(503) for _ in range(5)], "token")
    assert await run(script, clock, sleep, attempts=6, base=1.0, cap=4.0, deadline=100.0) == "token"
    bounds = [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.0, 4.0), (2.0, 4.0)]
    assert len(slept) == len(bounds)
    for delay, (low, high) in zip(slept, bounds, strict=True):
        assert low <= delay <= high
