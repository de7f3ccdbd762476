"""A user's tests of their own code, with the fixtures the cl-tokens plugin provides.

Run by tests/test_pytest_plugin.py in a pytest subprocess from a copy of this directory:
no conftest, so every fixture here comes from the installed package.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from cl_tokens import TokenError, TokenManager
from cl_tokens.testing import FakeAuthServer

closed_after_the_test: list[TokenManager] = []


def fetch_token(url: str, client_id: str, client_secret: str | None) -> dict[str, Any]:
    """The user's own synchronous code: a token request with the standard library."""
    body = {"grant_type": "client_credentials", "client_id": client_id}
    if client_secret is not None:
        body["client_secret"] = client_secret
    # S310: the URL is the fake server's, http on loopback.
    request = urllib.request.Request(  # noqa: S310
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        answer: dict[str, Any] = json.load(response)
    return answer


def test_a_sync_test_uses_the_fake_server(cl_fake_auth: FakeAuthServer) -> None:
    answer = fetch_token(cl_fake_auth.url, cl_fake_auth.client_id, cl_fake_auth.client_secret)
    assert answer["access_token"] == cl_fake_auth.issued[0]
    assert cl_fake_auth.token_requests == 1


@pytest.mark.asyncio
async def test_an_async_test_uses_the_manager(
    cl_token_manager: TokenManager, cl_fake_auth: FakeAuthServer
) -> None:
    headers = [await cl_token_manager.header() for _ in range(3)]
    assert headers[0] == {"Authorization": f"Bearer {cl_fake_auth.issued[0]}"}
    assert cl_fake_auth.token_requests == 1
    closed_after_the_test.append(cl_token_manager)


@pytest.mark.asyncio
async def test_the_manager_was_closed_at_teardown() -> None:
    (manager,) = closed_after_the_test
    with pytest.raises(TokenError, match="closed"):
        await manager.header()


class TestOptions:
    @pytest.fixture
    def cl_fake_auth_options(self) -> dict[str, Any]:
        return {"organization_slug": "acme", "client_id": "my-client"}

    @pytest.fixture
    def cl_token_manager_options(self) -> dict[str, Any]:
        return {"scope": "market:code:europe"}

    @pytest.mark.asyncio
    async def test_options_reach_the_server_and_the_manager(
        self, cl_token_manager: TokenManager, cl_fake_auth: FakeAuthServer
    ) -> None:
        token = await cl_token_manager.token()
        assert token.claims is not None
        assert token.claims.organization_slug == "acme"
        assert token.scope == "market:code:europe"
        assert cl_fake_auth.requests[0].body["client_id"] == "my-client"


def test_faults_are_injected_from_the_test(cl_fake_auth: FakeAuthServer) -> None:
    cl_fake_auth.fail_next(1, 503)
    with pytest.raises(urllib.error.HTTPError) as caught:
        fetch_token(cl_fake_auth.url, cl_fake_auth.client_id, cl_fake_auth.client_secret)
    assert caught.value.code == 503
