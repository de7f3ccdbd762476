"""Resilience: retries, malformed answers, rejected credentials, cool-down, refresh ahead,
serving while valid, the minimum refresh gap, and closing with work in flight.

Every test talks real HTTP to a ``FakeAuthServer`` on 127.0.0.1 and injects its faults
there. Expiry is driven either by a short ``expires_in`` on the server (real time) or by
an injected ``FakeClock`` (with ``clock_check_interval=0.01``, so the manager's periodic
wall-clock check retires hot entries soon after the clock is advanced).
"""

from __future__ import annotations

import asyncio
import email.utils
import gc
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fakeclock import FakeClock

import cl_tokens
from cl_tokens import AuthenticationError, TokenEndpointError, TokenError, TokenManager
from cl_tokens.testing import FakeAuthServer

CLIENT_ID = "test-client-id"
SECRET = "test-client-secret"
WRONG_SECRET = "wrong-secret-value-1234"
PACKAGE_DIR = os.path.dirname(cl_tokens.__file__)
TESTING_DIR = os.path.join(PACKAGE_DIR, "testing")


# -- helpers and fixtures ------------------------------------------------------------------


class LoopErrors:
    """Collects what reaches the event loop's exception handler.

    "Task exception was never retrieved" and "Task was destroyed but it is pending" are
    reported there (when the task is garbage collected), as are errors of callbacks.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.seen: list[dict[str, Any]] = []
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.seen.append(context)

    async def collect(self) -> list[str]:
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
        return [str(c.get("message")) + " " + repr(c.get("exception")) for c in self.seen]

    def restore(self) -> None:
        self.loop.set_exception_handler(self._previous)


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[LoopErrors]:
    """Fails a test whose event loop reported an error (leaked task exceptions above all)."""
    errors = LoopErrors(asyncio.get_running_loop())
    try:
        yield errors
        reported = await errors.collect()
    finally:
        errors.restore()
    assert reported == [], f"the event loop reported: {reported}"


def cl_tokens_tasks() -> list[asyncio.Task[Any]]:
    """Unfinished tasks running cl_tokens code (not the fake server's)."""
    found = []
    for task in asyncio.all_tasks():
        if task.done():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code is not None else ""
        if filename.startswith(PACKAGE_DIR) and not filename.startswith(TESTING_DIR):
            found.append(task)
    return found


@pytest.fixture
async def server() -> AsyncIterator[FakeAuthServer]:
    async with FakeAuthServer() as running:
        yield running


@asynccontextmanager
async def manager_for(
    server: FakeAuthServer, *, secret: str | None = SECRET, **options: Any
) -> AsyncIterator[TokenManager]:
    """A manager on ``server`` with fast backoff (unless the test says otherwise)."""
    settings: dict[str, Any] = {"backoff_base": 0.01, "backoff_cap": 0.05}
    settings.update(options)
    manager = TokenManager(CLIENT_ID, secret, auth_url=server.url, **settings)
    try:
        yield manager
    finally:
        await manager.aclose()
    assert cl_tokens_tasks() == []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def margin_of(token: cl_tokens.Token, safety_margin: float = 30.0) -> float:
    return min(safety_margin, 0.25 * token.lifetime)


# -- retries -------------------------------------------------------------------------------


async def test_two_503_then_ok_succeeds_after_three_requests(server: FakeAuthServer) -> None:
    server.fail_next(2, 503)
    async with manager_for(server) as manager:
        header = await manager.header()
    assert header["Authorization"].startswith("Bearer ")
    assert header["Authorization"] == f"Bearer {server.issued[-1]}"
    assert server.token_requests == 3
    assert len(server.issued) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_every_transient_status_is_retried(server: FakeAuthServer, status: int) -> None:
    server.fail_next(1, status)
    async with manager_for(server) as manager:
        token = await manager.token()
    assert token.access_token == server.issued[-1]
    assert server.token_requests == 2


async def test_a_5xx_with_an_html_page_is_retried_as_a_5xx(server: FakeAuthServer) -> None:
    server.fail_next(
        1, 502, body="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"
    )
    async with manager_for(server) as manager:
        token = await manager.token()
    assert token.access_token == server.issued[-1]
    assert server.token_requests == 2


async def test_429_with_retry_after_waits_that_long(server: FakeAuthServer) -> None:
    server.fail_next(1, 429, retry_after=1)
    async with manager_for(server) as manager:
        started = time.monotonic()
        token = await manager.token()
        elapsed = time.monotonic() - started
    assert token.access_token == server.issued[-1]
    assert server.token_requests == 2
    first, second = server.requests[0], server.requests[1]
    assert second.received_at - first.received_at >= 1.0
    assert 1.0 <= elapsed < 2.5  # Retry-After replaced the 10 ms backoff; no longer wait


async def test_retry_after_as_an_http_date_is_honoured(server: FakeAuthServer) -> None:
    # An HTTP date has one-second resolution: "now + 2 s" means 1 to 2 s from now.
    server.fail_next(1, 503, retry_after=email.utils.formatdate(time.time() + 2, usegmt=True))
    async with manager_for(server) as manager:
        started = time.monotonic()
        await manager.token()
        elapsed = time.monotonic() - started
    assert server.token_requests == 2
    assert 0.9 <= elapsed < 3.0


async def test_retry_after_past_the_fetch_deadline_fails_at_once_saying_when(
    server: FakeAuthServer,
) -> None:
    server.fail_next(1, 429, retry_after=120)
    async with manager_for(server) as manager:
        started = time.monotonic()
        with pytest.raises(TokenEndpointError) as caught:
            await manager.token()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0  # no waiting for a retry that could not happen within 30 s
    assert server.token_requests == 1
    error = caught.value
    assert error.status == 429
    assert error.retry_after == pytest.approx(120.0)
    message = str(error)
    assert "429" in message
    assert "120" in message
    assert "retry" in message.lower()


async def test_retry_after_is_measured_against_the_configured_deadline(
    server: FakeAuthServer,
) -> None:
    server.fail_next(1, 503, retry_after=3)
    async with manager_for(server, fetch_deadline=2.0) as manager:
        started = time.monotonic()
        with pytest.raises(TokenEndpointError, match="3 s"):
            await manager.token()
    assert time.monotonic() - started < 1.0
    assert server.token_requests == 1


async def test_a_response_slower_than_the_attempt_timeout_is_retried(
    server: FakeAuthServer,
) -> None:
    server.delay_next(1, 2.0)
    async with manager_for(server, attempt_timeout=0.3) as manager:
        started = time.monotonic()
        token = await manager.token()
        elapsed = time.monotonic() - started
    assert server.token_requests == 2
    assert 0.3 <= elapsed < 1.5  # gave up on the slow answer instead of waiting 2 s
    # The token is the one the second (prompt) request got, not the late one.
    assert token.access_token == server.issued[0]


async def test_a_connection_reset_is_retried(server: FakeAuthServer) -> None:
    server.reset_next(1)
    async with manager_for(server) as manager:
        token = await manager.token()
    assert server.token_requests == 2
    assert token.access_token == server.issued[-1]


async def test_two_resets_then_ok(server: FakeAuthServer) -> None:
    server.reset_next(2)
    async with manager_for(server) as manager:
        await manager.header()
    assert server.token_requests == 3


async def test_an_unreachable_endpoint_fails_after_the_attempts() -> None:
    url = f"http://127.0.0.1:{free_port()}/oauth/token"
    manager = TokenManager(CLIENT_ID, SECRET, auth_url=url, backoff_base=0.01, backoff_cap=0.05)
    try:
        started = time.monotonic()
        with pytest.raises(TokenEndpointError, match="unreachable") as caught:
            await manager.token()
        assert time.monotonic() - started < 3.0
    finally:
        await manager.aclose()
    assert caught.value.status is None
    assert SECRET not in str(caught.value)


async def test_retries_are_bounded_by_the_attempts(server: FakeAuthServer) -> None:
    server.fail_next(10, 503)
    async with manager_for(server) as manager:
        with pytest.raises(TokenEndpointError) as caught:
            await manager.token()
    assert server.token_requests == 3  # the default: 3 requests, the first included
    assert caught.value.status == 503
    assert "503" in str(caught.value)


async def test_the_attempts_option_is_honoured(server: FakeAuthServer) -> None:
    server.fail_next(4, 500)
    async with manager_for(server, attempts=5) as manager:
        await manager.token()
    assert server.token_requests == 5


async def test_the_fetch_deadline_bounds_all_attempts(server: FakeAuthServer) -> None:
    server.delay_next(10, 0.6)
    async with manager_for(
        server, attempts=10, attempt_timeout=0.25, fetch_deadline=0.6
    ) as manager:
        started = time.monotonic()
        with pytest.raises(TokenEndpointError, match="did not answer"):
            await manager.token()
        elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 0.9
    assert server.token_requests <= 3


async def test_a_transient_failure_backs_off_then_recovers(server: FakeAuthServer) -> None:
    server.fail_next(3, 503)
    async with manager_for(server) as manager:
        with pytest.raises(TokenEndpointError):
            await manager.token()
        with pytest.raises(TokenEndpointError, match="backing off") as caught:
            await manager.token()
        assert server.token_requests == 3
        await asyncio.sleep((caught.value.retry_after or 0) + 0.01)
        token = await manager.token()
    assert token.access_token == server.issued[-1]
    assert server.token_requests == 4


# -- malformed answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("not-json", "not JSON"),
        ("html", "not JSON"),
        ("empty", "not JSON"),
        ("not-object", "not a JSON object"),
        ("no-access-token", "access_token"),
        ("negative-expires-in", "expires_in"),
    ],
)
async def test_a_malformed_200_is_named_and_not_retried(
    server: FakeAuthServer, kind: str, problem: str
) -> None:
    server.malformed_next(1, kind)  # type: ignore[arg-type]
    async with manager_for(server) as manager:
        with pytest.raises(TokenEndpointError) as caught:
            await manager.token()
        assert server.token_requests == 1  # a server bug, not a transient fault
        message = str(caught.value)
        assert "malformed" in message
        assert problem in message
        assert SECRET not in message
        assert not caught.value.retryable
        # The next good response works: the failure was not cached.
        token = await manager.token()
    assert token.access_token == server.issued[-1]
    assert server.token_requests == 2


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"token_type": "Bearer", "expires_in": 7200, "access_token": ""}, "access_token"),
        ({"token_type": "Bearer", "expires_in": 7200, "access_token": 12345}, "access_token"),
        ({"token_type": "Bearer", "access_token": "abc.def.ghi"}, "expires_in"),
        ({"token_type": "Bearer", "access_token": "abc.def.ghi", "expires_in": 0}, "expires_in"),
        (
            {"token_type": "Bearer", "access_token": "abc.def.ghi", "expires_in": "soon"},
            "expires_in",
        ),
        ({"token_type": "Bearer", "access_token": "abc.def.ghi", "expires_in": True}, "expires_in"),
    ],
)
async def test_other_broken_token_fields_are_named(
    server: FakeAuthServer, payload: dict[str, Any], problem: str
) -> None:
    server.fail_next(1, 200, body=json.dumps(payload), content_type="application/json")
    async with manager_for(server) as manager:
        with pytest.raises(TokenEndpointError, match=problem):
            await manager.token()
        assert server.token_requests == 1
        await manager.token()
    assert server.token_requests == 2


# -- rejected credentials ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "title"),
    [
        (400, "BAD_REQUEST", "Bad Request"),
        (401, "UNAUTHORIZED", "Unauthorized"),
        (403, "FORBIDDEN", "Forbidden"),
    ],
)
async def test_rejections_are_never_retried(
    server: FakeAuthServer, status: int, code: str, title: str
) -> None:
    server.fail_next(1, status)
    async with manager_for(server) as manager:
        with pytest.raises(AuthenticationError) as caught:
            await manager.token()
    assert server.token_requests == 1
    error = caught.value
    assert error.status == status
    assert error.code == code
    assert error.title == title
    assert error.detail == title  # the fake server's detail for an injected status
    assert str(status) in str(error)
    assert code in str(error)


async def test_wrong_credentials_give_commerce_layers_error_fields(server: FakeAuthServer) -> None:
    async with manager_for(server, secret=WRONG_SECRET) as manager:
        with pytest.raises(AuthenticationError) as caught:
            await manager.header()
    assert server.token_requests == 1
    error = caught.value
    assert error.status == 401
    assert error.code == "UNAUTHORIZED"
    assert error.title == "invalid_client"
    assert error.detail is not None
    assert "Client authentication failed" in error.detail
    assert "invalid_client" in str(error)
    assert WRONG_SECRET not in str(error)


async def test_an_oauth2_style_rejection_is_understood(server: FakeAuthServer) -> None:
    body = json.dumps({"error": "invalid_scope", "error_description": "unknown market 999"})
    server.fail_next(1, 400, body=body, content_type="application/json")
    async with manager_for(server) as manager:
        with pytest.raises(AuthenticationError) as caught:
            await manager.token()
    assert server.token_requests == 1
    assert caught.value.status == 400
    assert caught.value.code == "invalid_scope"
    assert caught.value.detail == "unknown market 999"


async def test_a_rejection_that_echoes_the_secret_is_redacted(server: FakeAuthServer) -> None:
    body = json.dumps(
        {
            "errors": [
                {
                    "code": "UNAUTHORIZED",
                    "title": "invalid_client",
                    "detail": f"unknown secret {SECRET}",
                }
            ]
        }
    )
    server.fail_next(1, 401, body=body, content_type="application/json")
    async with manager_for(server) as manager:
        with pytest.raises(AuthenticationError) as caught:
            await manager.token()
    assert SECRET not in str(caught.value)
    assert caught.value.detail is not None
    assert SECRET not in caught.value.detail


# -- the authentication cool-down -----------------------------------------------------------


async def test_wrong_credentials_under_1000_calls_over_5_s_make_one_request_per_cooldown(
    server: FakeAuthServer,
) -> None:
    clock = FakeClock()
    async with manager_for(server, secret=WRONG_SECRET, clock=clock) as manager:
        errors: list[AuthenticationError] = []
        for _ in range(1000):  # 1,000 calls over 5 s of (fake) time
            with pytest.raises(AuthenticationError) as caught:
                await manager.header()
            errors.append(caught.value)
            clock.advance(0.005)
            await asyncio.sleep(0)
        assert server.token_requests == 1  # the default cool-down is 10 s
        first = errors[0]
        for error in errors:
            # Failing fast with the same error: same fields, the original message kept.
            assert (error.status, error.code, error.title, error.detail) == (
                first.status,
                first.code,
                first.title,
                first.detail,
            )
            assert str(first) in str(error)
        # The cool-down ends 10 s after the rejection: exactly one more request.
        clock.advance(10.0 - 5.0 + 0.01)
        with pytest.raises(AuthenticationError):
            await manager.header()
        assert server.token_requests == 2
        with pytest.raises(AuthenticationError):
            await manager.header()
        assert server.token_requests == 2
        # The credentials are fixed at the server: after the next cool-down, a token.
        server.client_secret = WRONG_SECRET
        clock.advance(10.01)
        header = await manager.header()
    assert header["Authorization"] == f"Bearer {server.issued[-1]}"
    assert server.token_requests == 3


async def test_wrong_credentials_in_real_time_make_a_handful_of_requests(
    server: FakeAuthServer,
) -> None:
    cooldown = 0.5
    async with manager_for(server, secret=WRONG_SECRET, auth_failure_cooldown=cooldown) as manager:
        outcomes: list[BaseException | None] = []

        async def caller(offset: float) -> None:
            await asyncio.sleep(offset)
            for _ in range(10):
                try:
                    await manager.header()
                    outcomes.append(None)
                except BaseException as exc:
                    outcomes.append(exc)
                await asyncio.sleep(0.01)

        # 1,000 calls from 100 coroutines, spread over about 1.1 s.
        started = time.monotonic()
        await asyncio.gather(*(caller(i * 0.01) for i in range(100)))
        spent = time.monotonic() - started
        assert len(outcomes) == 1000
        assert all(isinstance(o, AuthenticationError) for o in outcomes)
        assert server.token_requests <= spent / cooldown + 2
        assert server.token_requests >= 2  # the cool-down ended at least once meanwhile
        before = server.token_requests
        await asyncio.sleep(cooldown + 0.05)
        with pytest.raises(AuthenticationError):
            await manager.header()
        assert server.token_requests == before + 1


async def test_1000_concurrent_callers_with_wrong_credentials_make_one_request(
    server: FakeAuthServer,
) -> None:
    async with manager_for(server, secret=WRONG_SECRET) as manager:
        results = await asyncio.gather(
            *(manager.header() for _ in range(1000)), return_exceptions=True
        )
    assert all(isinstance(r, AuthenticationError) for r in results)
    assert {r.status for r in results if isinstance(r, AuthenticationError)} == {401}
    assert server.token_requests == 1


@pytest.mark.parametrize("status", [400, 403])
async def test_every_rejection_starts_a_cooldown(server: FakeAuthServer, status: int) -> None:
    clock = FakeClock()
    server.fail_next(1, status)
    async with manager_for(server, clock=clock, auth_failure_cooldown=5.0) as manager:
        with pytest.raises(AuthenticationError):
            await manager.token()
        clock.advance(4.9)
        with pytest.raises(AuthenticationError) as caught:
            await manager.token()
        assert caught.value.status == status
        assert server.token_requests == 1
        clock.advance(0.2)
        await manager.token()  # the injected rejection is gone: a token
    assert server.token_requests == 2


# -- refresh ahead and serving while valid -------------------------------------------------


async def test_refresh_window_with_the_endpoint_down_serves_the_token_until_the_margin(
    server: FakeAuthServer,
) -> None:
    clock = FakeClock()
    async with manager_for(server, clock=clock, clock_check_interval=0.01) as manager:
        first = await manager.token()
        expires_at = first.expires_at
        assert first.lifetime == 7200
        server.fail_next(100_000, 503)  # the endpoint goes down

        # Into the refresh window (600 s plus up to 60 s of jitter before expiry).
        clock.advance(expires_at - 590 - clock.time())
        await clock.settle()
        before = server.token_requests
        calls = failures = 0
        while clock.time() < expires_at - 120:
            results = await asyncio.gather(
                *(manager.header() for _ in range(20)), return_exceptions=True
            )
            for result in results:
                calls += 1
                if isinstance(result, BaseException):
                    failures += 1
                else:
                    assert result["Authorization"] == first.authorization
            await asyncio.sleep(0.01)  # let the background refresh run
            clock.advance(15.0)
            await clock.settle()
        assert failures == 0
        assert calls >= 600
        down_requests = server.token_requests - before
        # One refresh (3 attempts) per 30 s minimum gap, not one per call.
        assert 3 * 5 <= down_requests <= 3 * (470 / 30 + 2), (calls, down_requests)

        # The endpoint comes back: the next refresh after the gap brings a new token,
        # with one request however many callers ask meanwhile.
        server.clear_faults()
        clock.advance(31.0)  # past the minimum gap, still well before the margin
        await clock.settle()
        while any(t for t in cl_tokens_tasks() if t.get_name() != "cl_tokens clock check"):
            await asyncio.sleep(0.01)  # a refresh that was in flight may still finish
        before = server.token_requests
        headers = await asyncio.gather(*(manager.header() for _ in range(100)))
        assert {h["Authorization"] for h in headers} <= {
            first.authorization,
            *(f"Bearer {t}" for t in server.issued[1:]),
        }
        for _ in range(200):
            token = await manager.token()
            if token.access_token != first.access_token:
                break
            await asyncio.sleep(0.01)
        assert token.access_token != first.access_token
        assert token.access_token == server.issued[-1]
        headers = await asyncio.gather(*(manager.header() for _ in range(100)))
        assert {h["Authorization"] for h in headers} == {token.authorization}
    assert server.token_requests - before == 1


async def test_past_the_margin_callers_wait_on_a_blocking_fetch_and_get_its_error(
    server: FakeAuthServer,
) -> None:
    clock = FakeClock()
    async with manager_for(server, clock=clock, clock_check_interval=0.01) as manager:
        first = await manager.token()
        server.fail_next(100_000, 503)
        # Just outside the 30 s safety margin: still served (a refresh runs meanwhile).
        clock.advance(first.expires_at - 30.5 - clock.time())
        await clock.settle()
        assert await manager.token() == first
        await asyncio.sleep(0.1)
        # Inside the margin: never handed out; 50 callers share one failing fetch.
        clock.advance(1.0)
        await clock.settle()
        before = server.token_requests
        results = await asyncio.gather(
            *(manager.token() for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, TokenEndpointError) for r in results), results
        assert all(r.status == 503 for r in results if isinstance(r, TokenEndpointError))
        assert server.token_requests - before == 3  # one fetch of 3 attempts for all 50
        # The endpoint is back: once the back-off (1 s) has passed, a new token.
        server.clear_faults()
        with pytest.raises(TokenEndpointError, match="backing off"):
            await manager.token()
        assert server.token_requests - before == 3
        clock.advance(1.0)
        token = await manager.token()
    assert token.access_token != first.access_token
    assert token.expires_at > clock.time()


async def test_refresh_window_in_real_time_endpoint_down_then_back(server: FakeAuthServer) -> None:
    """expires_in 6 s: margin 1.5 s, window 3 s (+ up to 0.6 s jitter), minimum gap 0.6 s."""
    server.expires_in = 6
    async with manager_for(server) as manager:
        first = await manager.token()
        expires_at = first.expires_at
        server.fail_next(100_000, 503)
        state: dict[str, Any] = {"cleared_at_requests": None, "new": None}
        calls: list[tuple[float, str, float]] = []  # (time, authorization, latency)
        failures: list[tuple[float, BaseException]] = []
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    header = await manager.header()
                except TokenError as exc:
                    failures.append((time.time(), exc))
                else:
                    value = header["Authorization"]
                    calls.append((time.time(), value, time.monotonic() - started))
                    if value != first.authorization and state["new"] is None:
                        state["new"] = (time.time(), value)
                await asyncio.sleep(0.01)

        async def operator() -> None:
            # The endpoint stays down from the start of the refresh window until
            # 2.4 s before expiry, then comes back.
            await asyncio.sleep(max(0.0, expires_at - 2.4 - time.time()))
            state["down_requests"] = server.token_requests - 1
            server.clear_faults()
            state["cleared_at_requests"] = server.token_requests
            while state["new"] is None and time.time() < expires_at - 1.2:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            stop.set()

        await asyncio.gather(operator(), *(caller() for _ in range(50)))

    assert failures == []
    assert state["new"] is not None, "no new token before the safety margin"
    new_at, new_value = state["new"]
    assert new_at < expires_at - 1.5
    assert new_value == f"Bearer {server.issued[-1]}"
    assert len(server.issued) == 2
    # While down: at least one refresh (3 attempts), at most one per 0.6 s gap.
    assert 3 <= state["down_requests"] <= 3 * 4
    # Back up: exactly one more request, not one per caller.
    assert server.token_requests - state["cleared_at_requests"] == 1
    # Every call before the new token got the first one, without waiting on a refresh.
    assert all(value == first.authorization for t, value, _ in calls if t < new_at - 0.05)
    assert max(latency for _, _, latency in calls) < 0.25
    assert len(calls) > 5000


async def test_a_slow_refresh_never_blocks_callers(server: FakeAuthServer) -> None:
    clock = FakeClock()
    async with manager_for(server, clock=clock, clock_check_interval=0.01) as manager:
        first = await manager.token()
        server.delay_next(1, 0.6)
        clock.advance(first.expires_at - 590 - clock.time())
        await clock.settle()
        worst = 0.0
        for _ in range(40):
            started = time.monotonic()
            assert await manager.token() == first
            worst = max(worst, time.monotonic() - started)
            await asyncio.sleep(0.01)
        assert worst < 0.1
        assert server.token_requests == 2  # the one refresh, still waiting for its answer
        await asyncio.sleep(0.4)
        token = await manager.token()
    assert token.access_token != first.access_token


# -- the minimum gap between refresh attempts ------------------------------------------------


async def test_same_token_returned_waits_the_min_gap_fake_clock() -> None:
    # reissue_window=0: the server hands back the same token for (real) hours.
    async with FakeAuthServer(reissue_window=0.0) as server:
        clock = FakeClock()
        async with manager_for(server, clock=clock, clock_check_interval=0.01) as manager:
            first = await manager.token()
            clock.advance(first.expires_at - 590 - clock.time())
            await clock.settle()
            for _ in range(500):  # 500 calls over 500 s of the refresh window
                assert await manager.token() == first
                clock.advance(1.0)
                await asyncio.sleep(0.001)
            refreshes = server.token_requests - 1
        assert len(server.issued) == 1  # every refresh got the same token back
        assert 5 <= refreshes <= 500 / 30 + 2, refreshes


async def test_same_token_returned_in_real_time_makes_few_requests() -> None:
    """expires_in 5 s (margin 1.25 s, window 2.5 s + up to 0.5 s jitter, gap 0.5 s); the
    server reissues only in the last 2.2 s of a token's life."""
    async with FakeAuthServer(expires_in=5, reissue_window=2.2) as server:
        async with manager_for(server) as manager:
            first = await manager.token()
            counts = {"calls": 0, "failures": 0}
            stop = asyncio.Event()

            async def caller() -> None:
                while not stop.is_set():
                    try:
                        token = await manager.token()
                    except TokenError:
                        counts["failures"] += 1
                    else:
                        counts["calls"] += 1
                        assert token.expires_at > time.time()
                    await asyncio.sleep(0.005)

            async def watch() -> None:
                while time.time() < first.expires_at - 1.25:
                    await asyncio.sleep(0.05)
                stop.set()

            await asyncio.gather(watch(), *(caller() for _ in range(50)))
            latest = await manager.token()
        assert counts["failures"] == 0
        assert counts["calls"] > 3000
        same_answers = server.token_requests - len(server.issued)
        assert same_answers >= 1  # the endpoint did answer with the same token
        assert len(server.issued) == 2
        assert latest.access_token == server.issued[-1]
        # 1 first fetch + a refresh per 0.5 s gap from 2-2.5 s on: a handful, not thousands.
        assert server.token_requests <= 7, server.token_requests


async def test_a_failing_refresh_waits_the_min_gap(server: FakeAuthServer) -> None:
    clock = FakeClock()
    async with manager_for(server, clock=clock, clock_check_interval=0.01) as manager:
        first = await manager.token()
        server.fail_next(100_000, 503)
        clock.advance(first.expires_at - 590 - clock.time())
        await clock.settle()
        for _ in range(500):
            assert await manager.token() == first
            clock.advance(1.0)
            await asyncio.sleep(0.001)
        refresh_requests = server.token_requests - 1
    # 3 attempts per refresh, one refresh per 30 s gap at most.
    assert 3 * 5 <= refresh_requests <= 3 * (500 / 30 + 2), refresh_requests


async def test_a_rejected_refresh_keeps_serving_until_the_margin(
    server: FakeAuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    async with manager_for(server, clock=clock, clock_check_interval=0.01) as manager:
        first = await manager.token()
        server.client_secret = "rotated-secret"  # the credentials are revoked meanwhile
        clock.advance(first.expires_at - 590 - clock.time())
        await clock.settle()
        with caplog.at_level("WARNING", logger="cl_tokens"):
            for _ in range(200):
                assert await manager.token() == first
                clock.advance(1.0)
                await asyncio.sleep(0.002)
        rejected_refreshes = server.token_requests - 1
        assert 2 <= rejected_refreshes <= 200 / 30 + 2, rejected_refreshes
        assert any("rejected" in r.getMessage() for r in caplog.records)
        # Inside the margin: the rejection reaches the callers (never the old token).
        clock.advance(first.expires_at - 29 - clock.time())
        await clock.settle()
        with pytest.raises(AuthenticationError) as caught:
            await manager.token()
        assert caught.value.status == 401
        assert caught.value.code == "UNAUTHORIZED"


async def test_the_min_gap_counts_from_the_failure_of_a_slow_refresh(
    server: FakeAuthServer,
) -> None:
    # expires_in 7200: minimum gap 30 s. The refresh hangs and times out while 40 s of
    # (fake) time go by; the next attempt must wait 30 s from that failure.
    clock = FakeClock()
    async with manager_for(
        server, clock=clock, clock_check_interval=0.01, attempts=1, attempt_timeout=0.3
    ) as manager:
        first = await manager.token()
        clock.advance(first.expires_at - 590 - clock.time())
        await clock.settle()
        server.delay_next(1, 1.0)
        assert await manager.token() == first  # starts the refresh
        await asyncio.sleep(0.1)
        assert server.token_requests == 2
        clock.advance(40.0)
        await asyncio.sleep(0.4)  # the refresh times out: it failed "now"
        assert not [t for t in cl_tokens_tasks() if t.get_name() != "cl_tokens clock check"]
        clock.advance(1.0)
        assert await manager.token() == first
        await asyncio.sleep(0.05)
        assert server.token_requests == 2, "a refresh 1 s after a failed one"


# -- aclose with work in flight --------------------------------------------------------------


async def test_aclose_during_a_background_refresh(server: FakeAuthServer) -> None:
    clock = FakeClock()
    manager = TokenManager(
        CLIENT_ID, SECRET, auth_url=server.url, clock=clock, clock_check_interval=0.01
    )
    first = await manager.token()
    server.delay_next(1, 0.6)
    clock.advance(first.expires_at - 590 - clock.time())
    await clock.settle()
    assert await manager.token() == first  # starts the background refresh
    await asyncio.sleep(0.1)
    assert server.token_requests == 2
    assert len(cl_tokens_tasks()) >= 2  # the refresh and the clock check
    started = time.monotonic()
    await asyncio.wait_for(manager.aclose(), 2.0)
    assert time.monotonic() - started < 0.5
    assert cl_tokens_tasks() == []
    with pytest.raises(TokenError, match="closed"):
        await manager.header()
    await manager.aclose()  # idempotent


async def test_aclose_during_a_blocking_fetch_releases_every_waiter(
    server: FakeAuthServer,
) -> None:
    manager = TokenManager(CLIENT_ID, SECRET, auth_url=server.url)
    server.delay_next(1, 0.6)
    waiters = [asyncio.ensure_future(manager.header()) for _ in range(20)]
    await asyncio.sleep(0.1)
    assert server.token_requests == 1
    await asyncio.wait_for(manager.aclose(), 2.0)
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1.0)
    assert all(isinstance(r, TokenError) for r in results), results
    assert cl_tokens_tasks() == []
    assert server.token_requests == 1


@pytest.mark.parametrize("wait", ["backoff", "retry-after"])
async def test_aclose_while_a_fetch_waits_to_retry(server: FakeAuthServer, wait: str) -> None:
    if wait == "backoff":
        server.fail_next(1, 503)
        manager = TokenManager(
            CLIENT_ID, SECRET, auth_url=server.url, backoff_base=5.0, backoff_cap=5.0
        )
    else:
        server.fail_next(1, 429, retry_after=5)
        manager = TokenManager(CLIENT_ID, SECRET, auth_url=server.url)
    waiters = [asyncio.ensure_future(manager.token()) for _ in range(10)]
    await asyncio.sleep(0.2)
    assert server.token_requests == 1
    started = time.monotonic()
    await asyncio.wait_for(manager.aclose(), 2.0)
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1.0)
    assert time.monotonic() - started < 0.5
    assert all(isinstance(r, TokenError) for r in results), results
    assert cl_tokens_tasks() == []
    assert server.token_requests == 1


async def test_aclose_after_every_caller_left_a_fetch(server: FakeAuthServer) -> None:
    manager = TokenManager(CLIENT_ID, SECRET, auth_url=server.url)
    server.delay_next(1, 0.6)
    waiters = [asyncio.ensure_future(manager.token()) for _ in range(5)]
    await asyncio.sleep(0.1)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    # The flight goes on without them (its request is already spent) ...
    assert len(cl_tokens_tasks()) >= 1
    # ... until the manager is closed.
    await asyncio.wait_for(manager.aclose(), 2.0)
    assert cl_tokens_tasks() == []


async def test_a_failed_background_refresh_leaks_no_task_exception(
    server: FakeAuthServer, loop_errors: LoopErrors
) -> None:
    clock = FakeClock()
    async with manager_for(server, clock=clock, clock_check_interval=0.01) as manager:
        first = await manager.token()
        server.malformed_next(1, "html")
        clock.advance(first.expires_at - 590 - clock.time())
        await clock.settle()
        assert await manager.token() == first
        for _ in range(50):
            await asyncio.sleep(0.01)
            if server.token_requests == 2 and not [
                t for t in cl_tokens_tasks() if t.get_name() != "cl_tokens clock check"
            ]:
                break
        assert server.token_requests == 2
        assert await loop_errors.collect() == []


async def test_the_loop_error_capture_does_see_a_leaked_task_exception() -> None:
    # Guards the fixture above: an unretrieved task exception does reach it.
    errors = LoopErrors(asyncio.get_running_loop())
    try:

        async def boom() -> None:
            raise RuntimeError("leaked")

        task = asyncio.ensure_future(boom())
        await asyncio.sleep(0.01)
        assert task.done()
        del task
        reported = await errors.collect()
    finally:
        errors.restore()
    assert any("never retrieved" in r for r in reported), reported
