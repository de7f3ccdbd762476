"""The token request and the parsing of every answer shape (aioresponses: exact requests)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import ClientResponse
from aioresponses import aioresponses as _aioresponses
from yarl import URL

from cl_tokens import AuthenticationError, TokenEndpointError, TokenManager

URL_ = "https://auth.commercelayer.io/oauth/token"
SECRET = "very-secret-client-secret"


class _Response(ClientResponse):
    """aiohttp 3.14 made ``stream_writer`` a required argument that aioresponses 0.7.9
    does not pass (pnuckowski/aioresponses#289); a finished request only reads its
    ``output_size``."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class aioresponses(_aioresponses):
    def add(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _Response)
        super().add(*args, **kwargs)


def _manager(**kwargs: Any) -> TokenManager:
    kwargs.setdefault("attempts", 1)
    return TokenManager("my-client-id", SECRET, **kwargs)


async def test_the_request_is_exactly_the_documented_post() -> None:
    with aioresponses() as mocked:
        mocked.post(URL_, payload={"access_token": "abc.def.ghi", "expires_in": 7200})
        async with _manager(scope="market:code:europe") as manager:
            assert await manager.header() == {"Authorization": "Bearer abc.def.ghi"}
        ((key, calls),) = mocked.requests.items()
    assert key == ("POST", URL(URL_))
    (call,) = calls
    assert call.kwargs["json"] == {
        "grant_type": "client_credentials",
        "client_id": "my-client-id",
        "client_secret": SECRET,
        "scope": "market:code:europe",
    }
    assert call.kwargs["headers"]["Accept"] == "application/json"
    assert call.kwargs["timeout"].total == pytest.approx(10.0)
    assert call.kwargs["allow_redirects"] is False


@pytest.mark.parametrize(
    ("body", "code", "title", "detail"),
    [
        (
            {
                "errors": [
                    {
                        "code": "UNAUTHORIZED",
                        "title": "invalid_client",
                        "detail": "Client authentication failed",
                        "status": 401,
                    }
                ]
            },
            "UNAUTHORIZED",
            "invalid_client",
            "Client authentication failed",
        ),
        (
            {"errors": {"code": "FORBIDDEN", "title": "forbidden", "detail": "Not allowed"}},
            "FORBIDDEN",
            "forbidden",
            "Not allowed",
        ),
        (
            {"error": "invalid_client", "error_description": "Unknown client"},
            "invalid_client",
            None,
            "Unknown client",
        ),
        ({}, None, None, None),
    ],
)
@pytest.mark.parametrize("status", [400, 401, 403])
async def test_rejections_carry_commerce_layers_error_in_every_shape(
    status: int, body: dict[str, Any], code: str | None, title: str | None, detail: str | None
) -> None:
    with aioresponses() as mocked:
        mocked.post(URL_, status=status, payload=body, repeat=True)
        async with _manager(attempts=3) as manager:
            with pytest.raises(AuthenticationError) as info:
                await manager.header()
        assert sum(len(c) for c in mocked.requests.values()) == 1  # never retried
    error = info.value
    assert (error.status, error.code, error.title, error.detail) == (status, code, title, detail)
    assert f"HTTP {status}" in str(error)
    if detail:
        assert detail in str(error)


async def test_a_server_that_echoes_the_secret_does_not_leak_it() -> None:
    with aioresponses() as mocked:
        mocked.post(
            URL_,
            status=401,
            payload={"error": "invalid_client", "error_description": f"bad secret {SECRET}"},
        )
        async with _manager() as manager:
            with pytest.raises(AuthenticationError) as info:
                await manager.header()
    assert SECRET not in str(info.value)
    assert SECRET not in (info.value.detail or "")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"expires_in": 10}, "access_token"),
        ({"access_token": "", "expires_in": 10}, "access_token"),
        ({"access_token": "t", "expires_in": 0}, "expires_in"),
        ({"access_token": "t", "expires_in": "soon"}, "expires_in"),
        ({"access_token": "t", "expires_in": True}, "expires_in"),
        ({"access_token": "t"}, "expires_in"),
        ({"access_token": "t", "expires_in": 10, "token_type": 5}, "token_type"),
    ],
)
async def test_a_malformed_success_names_the_problem(payload: dict[str, Any], problem: str) -> None:
    with aioresponses() as mocked:
        mocked.post(URL_, payload=payload)
        async with _manager() as manager:
            with pytest.raises(TokenEndpointError, match=problem) as info:
                await manager.header()
    assert info.value.status == 200


async def test_token_fields_follow_the_contract() -> None:
    with aioresponses() as mocked:
        mocked.post(
            URL_,
            payload={
                "access_token": "a.b.c",
                "token_type": "bearer",
                "expires_in": "3600",
                "created_at": 1700000000,
            },
        )
        async with _manager(scope="market:code:europe") as manager:
            token = await manager.token()
            header = await manager.header()
    assert token.scope == "market:code:europe"  # none returned: the one requested
    assert token.lifetime == 3600
    assert token.created_at == 1700000000
    assert header == {"Authorization": "Bearer a.b.c"}


@pytest.mark.parametrize(
    "echo",
    [
        "Sup3r+Secret/Value=",  # verbatim
        "Sup3r%2BSecret%2FValue%3D",  # form-encoded, as a form body is sent
        "Sup3r%2BSecret/Value%3D",  # percent-encoded with / kept
    ],
)
async def test_an_echoed_secret_is_removed_in_every_encoding(echo: str) -> None:
    secret = "Sup3r+Secret/Value="
    with aioresponses() as mocked:
        mocked.post(
            URL_,
            status=401,
            payload={"error": "invalid_client", "error_description": f"got client_secret={echo}"},
        )
        async with TokenManager("id", secret, attempts=1, body_encoding="form") as manager:
            with pytest.raises(AuthenticationError) as info:
                await manager.header()
    assert echo not in str(info.value)
    assert "client_secret=***" in str(info.value)


def test_backend_urls_in_messages_hide_passwords_and_query_values() -> None:
    from cl_tokens.backends._base import redact_url

    assert redact_url("redis://u:pw@h:6379/0?password=TOP&db=1") == (
        "redis://u:***@h:6379/0?password=***&db=***"
    )
    assert redact_url("redis://:pw@[::1/0") == "<unparseable URL>"
