"""A caller's aiohttp session cannot change how token answers are read, nor carry its
own credentials to the token endpoint (real local server)."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import aiohttp
import pytest

from cl_tokens import AuthenticationError, ConfigurationError, TokenEndpointError, TokenManager
from cl_tokens._http import check_session
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"


async def _outcome(
    server: FakeAuthServer, session: aiohttp.ClientSession | None
) -> tuple[Any, ...]:
    """(error type, status, code, retry_after, requests) of two calls after one failure."""
    before = server.token_requests
    async with TokenManager(
        server.client_id, SECRET, auth_url=server.url, session=session, attempts=3
    ) as manager:
        errors = []
        for _ in range(2):
            try:
                await manager.header()
            except (AuthenticationError, TokenEndpointError) as exc:
                errors.append(exc)
    first = errors[0]
    return (
        [type(e).__name__ for e in errors],
        first.status,
        getattr(first, "code", None),
        getattr(first, "retry_after", None),
        server.token_requests - before,
    )


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(401, None), (403, None), (429, "60"), (503, "60")],
)
async def test_a_raise_for_status_session_gets_the_same_errors_as_our_own(
    status: int, retry_after: str | None
) -> None:
    """Before, a 401 became aiohttp's ClientResponseError: retried as a TokenEndpointError,
    no cool-down, code and Retry-After lost."""
    async with FakeAuthServer(client_secret=SECRET) as server:
        server.fail_next(10, status, retry_after=retry_after)
        ours = await _outcome(server, None)
        server.clear_faults()
        server.fail_next(10, status, retry_after=retry_after)
        async with aiohttp.ClientSession(raise_for_status=True) as session:
            theirs = await _outcome(server, session)
    assert theirs == ours
    kinds, got_status, _, got_retry_after, _ = theirs
    assert got_status == status
    if status in (401, 403):
        assert kinds == ["AuthenticationError", "AuthenticationError"]
    if retry_after is not None:
        assert got_retry_after == pytest.approx(60, abs=1)


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer other-api-key"}, {"cookie": "session=abc"}],
    ids=["authorization", "cookie"],
)
async def test_a_session_with_default_credentials_is_refused(headers: dict[str, str]) -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        async with aiohttp.ClientSession(headers=headers) as session:
            with pytest.raises(ConfigurationError, match="default credentials") as info:
                check_session(session)
            # Refused at construction, before any call could send it.
            with pytest.raises(ConfigurationError, match="default credentials"):
                TokenManager(server.client_id, SECRET, auth_url=server.url, session=session)
        assert server.requests == []  # refused before anything was sent
    value = next(iter(headers.values()))
    assert value not in str(info.value)


def test_a_session_with_default_basic_auth_is_refused() -> None:
    async def check() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            session = aiohttp.ClientSession(auth=aiohttp.BasicAuth("user", "hunter2-pass"))
        try:
            with pytest.raises(ConfigurationError, match="auth=") as info:
                check_session(session)
            assert "hunter2" not in str(info.value)
        finally:
            await session.close()

    asyncio.run(check())


async def test_our_headers_win_and_session_middlewares_are_not_applied() -> None:
    seen: list[str] = []

    async def add_header(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        seen.append(str(request.url))
        request.headers["X-Middleware"] = "yes"
        return await handler(request)

    async with (
        FakeAuthServer(client_secret=SECRET) as server,
        aiohttp.ClientSession(
            headers={"Accept": "text/html", "User-Agent": "someone-else"},
            middlewares=(add_header,),
        ) as session,
        TokenManager(server.client_id, SECRET, auth_url=server.url, session=session) as manager,
    ):
        await manager.header()
        assert await manager.revoke() is True
    for request in server.requests:
        assert request.headers["Accept"] == "application/json"
        assert request.headers["User-Agent"].startswith("cl-tokens/")
        assert "X-Middleware" not in request.headers
    assert seen == []
