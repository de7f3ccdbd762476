"""aiohttp middleware, httpx Auth, revocation and API URLs, over real HTTP (FakeAuthServer)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from cl_tokens import (
    AuthenticationError,
    ConfigurationError,
    Token,
    TokenEndpointError,
    TokenManager,
)
from cl_tokens._aiohttp_middleware import TokenMiddleware
from cl_tokens._revoke import revocation_url, revoke_token
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"  # the one tests/conftest.py gives the server

MakeManager = Callable[..., TokenManager]


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def jwt_token(payload: dict[str, Any]) -> Token:
    """A JWT-shaped (unsigned) token carrying ``payload``."""
    access = f"{_b64({'alg': 'RS512'})}.{_b64(payload)}.c2lnbmF0dXJl"
    return Token(access_token=access, token_type="Bearer", scope=None, expires_at=2e9)


async def get_status(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    async with session.get(url, **kwargs) as response:
        await response.read()
        return response.status


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """Another origin (a foreign host as far as the token goes) that records headers."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


# -- aiohttp middleware ------------------------------------------------------------------


async def test_aiohttp_expired_token_makes_one_fetch_and_each_request_retries_once(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    url = server.api_url + "/orders"
    async with aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()]) as session:
        first = await asyncio.gather(*(get_status(session, url) for _ in range(100)))
        assert first == [200] * 100
        assert (server.token_requests, server.api_requests) == (1, 100)

        server.expire(server.issued[0])
        tokens, calls = server.token_requests, server.api_requests
        second = await asyncio.gather(*(get_status(session, url) for _ in range(100)))

    assert second == [200] * 100
    assert server.token_requests - tokens == 1
    assert server.api_requests - calls == 200
    assert (await manager.token()).access_token == server.issued[1]


async def test_aiohttp_retry_resends_the_body(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    await manager.header()
    server.expire(server.issued[0])
    async with (
        aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()]) as session,
        session.post(server.api_url + "/orders", json={"data": {}}) as response,
    ):
        assert response.status == 200
    assert server.api_requests == 2


async def _upload() -> AsyncIterator[bytes]:
    """A streamed request body: one-shot, so a request carrying it cannot be resent."""
    yield b"chunk"


async def test_aiohttp_401_to_a_streamed_upload_still_invalidates_the_token(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    stale = (await manager.token()).access_token
    server.expire(stale)
    async with (
        aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()]) as session,
        session.post(server.api_url + "/imports", data=_upload()) as response,
    ):
        assert response.status == 401  # the body is gone: returned without a retry
        assert (await response.json())["errors"][0]["code"] == "INVALID_TOKEN"
    assert server.api_requests == 1
    # ...but the refused token is no longer cached: the caller's retry gets a fresh one.
    assert (await manager.token()).access_token != stale
    assert server.token_requests == 2


async def test_aiohttp_second_401_is_returned_as_is_after_one_retry(
    server: FakeAuthServer, make_manager: MakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "is_live", lambda token: False)
    manager = make_manager()
    async with (
        aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()]) as session,
        session.get(server.api_url + "/orders") as response,
    ):
        assert response.status == 401
        body = await response.json()
    assert body["errors"][0]["code"] == "INVALID_TOKEN"
    assert server.api_requests == 2
    assert server.token_requests == 2


async def test_aiohttp_same_token_again_returns_the_first_401_readable(
    server: FakeAuthServer, make_manager: MakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.reissue_window = 900  # like Commerce Layer: the same token until its last 15 min
    monkeypatch.setattr(server, "is_live", lambda token: False)
    manager = make_manager()
    async with (
        aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()]) as session,
        session.get(server.api_url + "/orders") as response,
    ):
        assert response.status == 401
        assert (await response.json())["errors"][0]["code"] == "INVALID_TOKEN"
    assert server.api_requests == 1  # a retry with the same token would only fail again
    assert server.token_requests == 2


async def test_aiohttp_explicit_authorization_header_wins_without_retry(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    async with aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()]) as session:
        status = await get_status(
            session, server.api_url + "/orders", headers={"Authorization": "Bearer mine"}
        )
    assert status == 401
    assert (server.api_requests, server.token_requests) == (1, 0)


async def test_aiohttp_token_stays_off_foreign_hosts_unless_allowed(
    server: FakeAuthServer,
    make_manager: MakeManager,
    echo: tuple[str, list[dict[str, str]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    echo_url, seen = echo
    manager = make_manager()
    async with aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()]) as session:
        assert await get_status(session, echo_url + "/x") == 401
        assert await get_status(session, echo_url + "/y") == 401
    assert [h.get("Authorization") for h in seen] == [None, None]
    assert server.token_requests == 0  # no token is fetched for a request that gets none
    warnings = [r for r in caplog.records if "not sending the Commerce Layer token" in r.message]
    assert len(warnings) == 1  # once per host

    seen.clear()
    allowed = TokenMiddleware(manager, hosts=["127.0.0.1"])
    async with aiohttp.ClientSession(middlewares=[allowed]) as session:
        assert await get_status(session, echo_url + "/z") == 401
    # Allowed: it got the token, and its 401 caused one invalidation and one retry.
    assert [h.get("Authorization") for h in seen] == [f"Bearer {t}" for t in server.issued]
    assert len(server.issued) == 2


async def test_aiohttp_manager_sharing_the_middleware_session_does_not_deadlock(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    middlewares: list[aiohttp.ClientMiddlewareType] = []
    # aiohttp keeps the sequence it is given, so the middleware can join after the manager.
    async with aiohttp.ClientSession(middlewares=middlewares) as session:
        manager = make_manager(session=session)
        middlewares.append(manager.aiohttp_middleware())
        # A fetch started outside the middleware: its request meets the middleware.
        await asyncio.wait_for(manager.header(), 5)
        server.expire(server.issued[0])
        # A fetch started inside the middleware (the retry after the 401).
        assert await asyncio.wait_for(get_status(session, server.api_url + "/orders"), 5) == 200
        assert await asyncio.wait_for(manager.revoke(), 5) is True
    for request in server.requests:  # token and revocation requests carry no bearer token
        assert "Authorization" not in request.headers
    assert (server.token_requests, server.revoke_requests) == (2, 1)


async def test_aiohttp_middleware_rejects_a_string_for_hosts(make_manager: MakeManager) -> None:
    with pytest.raises(ConfigurationError):
        TokenMiddleware(make_manager(), hosts="api.example.com")


# -- httpx Auth --------------------------------------------------------------------------


async def test_httpx_expired_token_makes_one_fetch_and_each_request_retries_once(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    url = server.api_url + "/orders"
    async with httpx.AsyncClient(auth=manager.httpx_auth()) as client:
        first = await asyncio.gather(*(client.get(url) for _ in range(100)))
        assert [r.status_code for r in first] == [200] * 100
        assert (server.token_requests, server.api_requests) == (1, 100)

        server.expire(server.issued[0])
        tokens, calls = server.token_requests, server.api_requests
        second = await asyncio.gather(*(client.get(url) for _ in range(100)))

    assert [r.status_code for r in second] == [200] * 100
    assert server.token_requests - tokens == 1
    assert server.api_requests - calls == 200


async def test_httpx_second_401_is_returned_as_is_after_one_retry(
    server: FakeAuthServer, make_manager: MakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "is_live", lambda token: False)
    manager = make_manager()
    async with httpx.AsyncClient(auth=manager.httpx_auth()) as client:
        response = await client.post(server.api_url + "/orders", json={"data": {}})
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "INVALID_TOKEN"
    assert server.api_requests == 2
    assert server.token_requests == 2


async def test_httpx_401_to_a_streamed_upload_still_invalidates_the_token(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    stale = (await manager.token()).access_token
    server.expire(stale)
    async with httpx.AsyncClient(auth=manager.httpx_auth()) as client:
        response = await client.post(server.api_url + "/imports", content=_upload())
        assert response.status_code == 401  # the body is gone: returned without a retry
        assert server.api_requests == 1
        # ...but the refused token is no longer cached: the next request gets a fresh one.
        assert (await manager.token()).access_token != stale
        again = await client.post(server.api_url + "/imports", content=_upload())
    assert again.status_code == 200
    assert server.token_requests == 2


async def test_httpx_explicit_header_and_foreign_hosts_are_left_alone(
    server: FakeAuthServer, make_manager: MakeManager, echo: tuple[str, list[dict[str, str]]]
) -> None:
    echo_url, seen = echo
    manager = make_manager()
    async with httpx.AsyncClient(auth=manager.httpx_auth()) as client:
        mine = await client.get(server.api_url + "/x", headers={"Authorization": "Bearer mine"})
        foreign = await client.get(echo_url + "/x")
    assert (mine.status_code, foreign.status_code) == (401, 401)
    assert server.api_requests == 1
    assert [h.get("authorization") for h in seen] == [None]


def test_httpx_sync_client_is_refused_clearly() -> None:
    # Nothing listens on the discard port: the refusal comes before any I/O.
    manager = TokenManager("id", "secret", auth_url="http://127.0.0.1:9/oauth/token")
    with (
        httpx.Client(auth=manager.httpx_auth()) as client,
        pytest.raises(ConfigurationError, match="AsyncClient"),
    ):
        client.get("http://127.0.0.1:9/api/orders")


# -- revocation --------------------------------------------------------------------------


async def test_revoke_revokes_the_cached_token_and_the_next_call_fetches_a_new_one(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    first = await manager.header()
    assert await manager.revoke() is True
    assert server.revoke_requests == 1
    assert server.issued[0] in server.revoked
    request = next(r for r in server.requests if r.path == "/oauth/revoke")
    assert request.content_type == "application/json"
    assert request.body == {
        "client_id": server.client_id,
        "client_secret": SECRET,
        "token": server.issued[0],
    }
    second = await manager.header()
    assert second != first
    assert server.token_requests == 2


async def test_revoke_without_a_cached_token_sends_nothing(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    assert await manager.revoke() is False
    assert (server.revoke_requests, server.token_requests) == (0, 0)


async def test_revoke_rejected_raises_authentication_error_without_secrets(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    token = await make_manager().token()
    wrong = "wrong-secret-value-1234567"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(AuthenticationError) as caught:
            await revoke_token(
                session,
                token,
                auth_url=server.url,
                client_id=server.client_id,
                client_secret=wrong,
                timeout=5,
            )
    assert caught.value.status == 401
    assert caught.value.code == "UNAUTHORIZED"
    assert wrong not in str(caught.value)
    assert token.access_token not in str(caught.value)
    assert token.access_token not in server.revoked


async def test_revoke_server_error_is_a_token_endpoint_error_that_echoes_no_secret() -> None:
    async def handle(request: web.Request) -> web.Response:
        echoed = (await request.read()).decode()
        error = {"code": "BOOM", "title": "failed", "detail": f"could not handle {echoed}"}
        return web.json_response({"errors": [error]}, status=503)

    app = web.Application()
    app.router.add_post("/oauth/revoke", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    token = jwt_token({"iss": base})
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TokenEndpointError) as caught:
                await revoke_token(
                    session,
                    token,
                    auth_url=base + "/oauth/token",
                    client_id="id",
                    client_secret=SECRET,
                    timeout=5,
                )
    finally:
        await runner.cleanup()
    message = str(caught.value)
    assert caught.value.status == 503
    assert caught.value.retryable
    assert "BOOM" in message
    assert SECRET not in message
    assert token.access_token not in message


async def test_revoke_unreachable_endpoint_is_a_token_endpoint_error() -> None:
    token = jwt_token({"iss": "http://127.0.0.1:9"})  # the discard port: nothing listens
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TokenEndpointError) as caught:
            await revoke_token(
                session,
                token,
                auth_url="http://127.0.0.1:9/oauth/token",
                client_id="id",
                client_secret=SECRET,
                timeout=5,
            )
    assert SECRET not in str(caught.value)
    assert token.access_token not in str(caught.value)


@pytest.mark.parametrize(
    ("iss", "expected"),
    [
        pytest.param(None, "https://auth.example.com/oauth/revoke", id="no-iss"),
        pytest.param(
            "https://auth.example.com/", "https://auth.example.com/oauth/revoke", id="same-host"
        ),
        pytest.param(
            "https://auth.commercelayer.io",
            "https://auth.example.com/oauth/revoke",
            id="commerce-layer-is-another-origin",
        ),
        pytest.param(
            "https://auth.example.com/\x1b[2J", "https://auth.example.com/oauth/revoke", id="escape"
        ),
        pytest.param(
            "https://auth.example.com:8443",
            "https://auth.example.com/oauth/revoke",
            id="same-host-other-port",
        ),
        pytest.param(
            "https://auth.example.com:443", "https://auth.example.com:443/oauth/revoke", id="port"
        ),
        pytest.param(
            "http://auth.commercelayer.io",
            "https://auth.example.com/oauth/revoke",
            id="plain-http-not-loopback",
        ),
        pytest.param("https://evil.example", "https://auth.example.com/oauth/revoke", id="foreign"),
        pytest.param(
            "https://auth.commercelayer.io.evil.example",
            "https://auth.example.com/oauth/revoke",
            id="look-alike",
        ),
        pytest.param(
            "http://127.0.0.1:8080", "https://auth.example.com/oauth/revoke", id="other-loopback"
        ),
    ],
)
def test_revocation_url_sends_the_secret_only_to_trusted_issuers(
    iss: str | None, expected: str
) -> None:
    token = jwt_token({} if iss is None else {"iss": iss})
    assert revocation_url(token, "https://auth.example.com/oauth/token") == expected


def test_revocation_url_of_an_opaque_token_is_the_auth_origin() -> None:
    token = Token(access_token="opaque", token_type="Bearer", scope=None, expires_at=2e9)
    assert revocation_url(token, "http://localhost:8000/x/oauth/token") == (
        "http://localhost:8000/oauth/revoke"
    )


# -- API URLs from the token -------------------------------------------------------------


async def test_api_urls_from_a_fake_server_token(make_manager: MakeManager) -> None:
    token = await make_manager().token()
    assert token.core_api_url == "https://fake-org.commercelayer.io"
    assert token.provisioning_api_url == "https://provisioning.commercelayer.io"
    assert token.claims is not None
    assert token.claims.core_api_url == "https://fake-org.commercelayer.io"


def test_api_urls_follow_the_issuer_domain() -> None:
    token = jwt_token({"iss": "https://auth.commercelayer.co", "organization": {"slug": "Acme-2"}})
    assert token.core_api_url == "https://acme-2.commercelayer.co"
    assert token.provisioning_api_url == "https://provisioning.commercelayer.co"


@pytest.mark.parametrize("slug", ["evil.example/x", "a b", "", "-x", "évil", 42])
def test_core_api_url_is_none_for_a_slug_that_is_not_a_host_label(slug: object) -> None:
    token = jwt_token({"organization": {"slug": slug}})
    assert token.core_api_url is None
    assert token.provisioning_api_url == "https://provisioning.commercelayer.io"


def test_api_urls_of_an_opaque_token_are_none() -> None:
    token = Token(access_token="opaque", token_type="Bearer", scope=None, expires_at=2e9)
    assert token.core_api_url is None
    assert token.provisioning_api_url is None


def test_provisioning_token_has_no_core_api_url() -> None:
    token = jwt_token({"iss": "https://auth.commercelayer.io", "scope": "provisioning-api"})
    assert token.core_api_url is None
    assert token.provisioning_api_url == "https://provisioning.commercelayer.io"


def test_log_records_hold_no_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cl_tokens")
    token = jwt_token({"iss": "https://evil.example"})
    revocation_url(token, "https://auth.example.com/oauth/token")
    assert all(token.access_token not in r.getMessage() for r in caplog.records)
