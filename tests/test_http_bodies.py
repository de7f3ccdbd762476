"""Bodies are read whole, whatever their framing, up to a 64 KB cap (real sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from raw_http import RawHTTPServer, Reply

from cl_tokens import AuthenticationError, Token, TokenEndpointError, TokenManager
from cl_tokens._revoke import revoke_token

ACCESS = "eyJhbGciOiJSUzUxMiJ9.eyJzY29wZSI6Im1hcmtldDphbGwifQ.c2lnbmF0dXJl"
GOOD = {"access_token": ACCESS, "token_type": "Bearer", "expires_in": 7200, "scope": "market:all"}


def _manager(server: RawHTTPServer, **kwargs: Any) -> TokenManager:
    kwargs.setdefault("attempts", 3)
    kwargs.setdefault("backoff_base", 0.01)
    return TokenManager("client-id", "client-secret", auth_url=server.url, **kwargs)


async def _token_from(*replies: Reply, **kwargs: Any) -> tuple[Token, int]:
    async with RawHTTPServer(replies) as server, _manager(server, **kwargs) as manager:
        token = await manager.token()
    return token, len(server.requests)


async def test_a_token_response_split_across_two_segments_is_one_token() -> None:
    token, requests = await _token_from(Reply.json(GOOD, parts=2, pause=0.2))
    assert (token.access_token, token.lifetime, requests) == (ACCESS, 7200, 1)


async def test_a_chunked_token_response_is_one_token() -> None:
    token, requests = await _token_from(Reply.json(GOOD, parts=5, chunked=True, pause=0.05))
    assert (token.access_token, token.scope, requests) == (ACCESS, "market:all", 1)


async def test_a_token_response_in_single_bytes_is_one_token() -> None:
    body = json.dumps(GOOD).encode()
    reply = Reply(segments=[body[i : i + 1] for i in range(len(body))], pause=0.0)
    token, _ = await _token_from(reply)
    assert token.access_token == ACCESS


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_200_kb_body_is_a_malformed_answer_naming_the_cap(chunked: bool) -> None:
    # Valid JSON, padded: the only fault is the size.
    huge = json.dumps({**GOOD, "padding": "x" * 200_000}).encode()
    segments = [huge[i : i + 16_384] for i in range(0, len(huge), 16_384)]
    reply = Reply(segments=segments, chunked=chunked, pause=0.0)
    async with RawHTTPServer([reply]) as server, _manager(server) as manager:
        with pytest.raises(TokenEndpointError, match="64 KB cap") as info:
            await manager.token()
        assert len(server.requests) == 1  # a malformed 200 is a server bug: not retried
    assert info.value.status == 200
    assert not info.value.retryable


async def test_an_error_body_in_parts_keeps_its_code_and_detail() -> None:
    error = {"errors": [{"code": "UNAUTHORIZED", "title": "invalid_client", "detail": "nope"}]}
    reply = Reply.json(error, parts=3, status=401, pause=0.1)
    async with RawHTTPServer([reply]) as server, _manager(server) as manager:
        with pytest.raises(AuthenticationError) as info:
            await manager.token()
    assert (info.value.status, info.value.code, info.value.detail) == (401, "UNAUTHORIZED", "nope")


async def test_an_oversized_error_body_keeps_its_status_and_says_it_was_not_read() -> None:
    reply = Reply(status=503, segments=[b"x" * 100_000], pause=0.0, headers={"Retry-After": "0"})
    async with RawHTTPServer([reply, Reply.json(GOOD)]) as server:
        async with _manager(server, attempts=2) as manager:
            token = await manager.token()  # the 503 was retried as a 503
        assert len(server.requests) == 2
    assert token.access_token == ACCESS
    async with RawHTTPServer([reply]) as server, _manager(server, attempts=1) as manager:
        with pytest.raises(TokenEndpointError, match=r"HTTP 503.*64 KB cap") as info:
            await manager.token()
    assert info.value.retryable


def _token() -> Token:
    return Token(access_token=ACCESS, token_type="Bearer", scope=None, expires_at=2e9)


async def test_a_revocation_answer_in_chunks_is_read_whole() -> None:
    import aiohttp

    ok = Reply.json({"revoked": True}, parts=3, chunked=True)
    error = Reply.json({"errors": [{"code": "FORBIDDEN", "detail": "not yours"}]}, status=401)
    async with RawHTTPServer([ok, error]) as server, aiohttp.ClientSession() as session:
        for _ in range(2):
            try:
                await revoke_token(
                    session,
                    _token(),
                    auth_url=server.url,
                    client_id="id",
                    client_secret="client-secret",
                    timeout=5,
                )
            except AuthenticationError as exc:
                rejected = exc
        assert [r[1] for r in server.requests] == ["/oauth/revoke"] * 2
    assert (rejected.code, rejected.detail) == ("FORBIDDEN", "not yours")
