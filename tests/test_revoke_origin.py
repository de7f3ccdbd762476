"""Revocation sends the client secret only to the exact auth origin (real servers)."""

from __future__ import annotations

import pytest

from cl_tokens import TokenManager
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"


async def test_an_issuer_on_another_port_of_the_auth_host_gets_nothing() -> None:
    """The attacker runs a server on another port of the auth host and gets tokens
    naming it as ``iss`` (or plants one in a shared cache): revoke() must not send it
    the client secret."""
    async with (
        FakeAuthServer(client_secret=SECRET) as attacker,
        FakeAuthServer(client_secret=SECRET, issuer=attacker.base_url) as auth,
    ):
        assert auth.base_url.rsplit(":", 1)[0] == attacker.base_url.rsplit(":", 1)[0]
        async with TokenManager(auth.client_id, SECRET, auth_url=auth.url) as manager:
            token = await manager.token()
            assert token.claims is not None
            assert token.claims.iss == attacker.base_url
            assert await manager.revoke() is True
        assert attacker.requests == []  # not one byte of the request went there
        assert auth.revoke_requests == 1
        assert token.access_token in auth.revoked


@pytest.mark.parametrize("suffix", ["", "/"])
async def test_an_issuer_that_is_the_auth_origin_is_followed(suffix: str) -> None:
    async with FakeAuthServer(client_secret=SECRET) as auth:
        auth.issuer = auth.base_url + suffix
        async with TokenManager(auth.client_id, SECRET, auth_url=auth.url) as manager:
            await manager.token()
            assert await manager.revoke() is True
        assert auth.revoke_requests == 1
