"""The public API as a user writes it, type-checked by ``mypy --strict`` in CI.

Never run: it only has to type-check, so a change to a public signature that would
break users' type checking breaks CI first.
"""

from __future__ import annotations

import aiohttp
import httpx
import requests

from cl_tokens import (
    AuthenticationError,
    ConfigurationError,
    Settings,
    SyncTokenManager,
    Token,
    TokenClaims,
    TokenError,
    TokenManager,
    Tuning,
)
from cl_tokens.backends import FileBackend, MemoryBackend, TokenBackend, backend_from_url
from cl_tokens.testing import FakeAuthServer


async def use_the_manager() -> None:
    async with TokenManager("id", "secret", scope="market:code:europe") as manager:
        header: dict[str, str] = await manager.header()
        token: Token = await manager.token("market:code:usa")
        claims: TokenClaims | None = token.claims
        slug: str | None = claims.organization_slug if claims is not None else None
        api: str | None = token.core_api_url
        dropped: bool = await manager.invalidate(token.access_token)
        revoked: bool = await manager.revoke()
        tuning: Tuning = manager.tuning
        del header, slug, api, dropped, revoked, tuning


async def configure() -> None:
    settings = Settings.from_env({"CL_CLIENT_ID": "id"})
    manager = TokenManager.from_settings(settings, session=aiohttp.ClientSession())
    other = TokenManager.from_env(prefix="MYAPP_")
    shared: TokenBackend = MemoryBackend()
    files: TokenBackend = FileBackend("/var/cache/cl-tokens")
    redis: TokenBackend = backend_from_url("redis://localhost:6379/0")
    third = TokenManager("id", backend=shared, strict=True, hot_tier=False)
    for each in (manager, other, third):
        await each.aclose()
    for backend in (shared, files, redis):
        await backend.aclose()


async def integrate(manager: TokenManager) -> None:
    async with (
        aiohttp.ClientSession(middlewares=[manager.aiohttp_middleware()]) as http,
        http.get("https://demo.commercelayer.io/api/skus") as response,
    ):
        response.raise_for_status()


async def handle_errors(manager: TokenManager) -> str:
    try:
        return (await manager.header())["Authorization"]
    except AuthenticationError as error:
        return f"{error.status} {error.code} {error.detail}"
    except ConfigurationError:
        raise
    except TokenError:
        return ""


async def test_with_the_fake_server() -> None:
    async with FakeAuthServer(expires_in=60, latency=0.01) as server:
        server.fail_next(1, 503, retry_after=1)
        async with TokenManager(server.client_id, server.client_secret, auth_url=server.url) as m:
            await m.header()
        count: int = server.token_requests
        del count


def use_the_sync_manager() -> None:
    with SyncTokenManager("id", "secret", scope="market:code:europe") as manager:
        header: dict[str, str] = manager.header()
        token: Token = manager.token("market:code:usa")
        dropped: bool = manager.invalidate(token.access_token)
        revoked: bool = manager.revoke()
        tuning: Tuning = manager.tuning
        login: Token = manager.login("ann@example.com", "password", scope="market:code:europe")
        owner = login.owner_id or ""
        customer: dict[str, str] = manager.header(customer=owner)
        gone: bool = manager.logout(owner)
        del header, dropped, revoked, tuning, customer, gone
    other = SyncTokenManager.from_env(prefix="MYAPP_")
    third = SyncTokenManager.from_settings({"client_id": "id"}, attempts=2)
    for each in (other, third):
        each.close()


def integrate_sync(manager: SyncTokenManager) -> None:
    with requests.Session() as session:
        session.auth = manager.requests_auth(hosts=["*.example.com"], customer="owner-id")
        session.get("https://demo.commercelayer.io/api/skus").raise_for_status()
    with httpx.Client(auth=manager.httpx_auth()) as client:
        client.get("https://demo.commercelayer.io/api/skus").raise_for_status()


async def readme_claims(manager: TokenManager) -> None:
    token = await manager.token()
    claims = token.claims
    if claims is not None:
        slug: str | None = claims.organization_slug
        organization = claims["organization"]
        del slug, organization
