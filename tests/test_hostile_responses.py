"""A hostile or broken token endpoint gets a TokenError naming the fault, never another
exception type and never a header built from its values (real sockets, then properties)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raw_http import RawHTTPServer, Reply

from cl_tokens import Token, TokenEndpointError, TokenError, TokenManager
from cl_tokens._clock import SystemClock
from cl_tokens._endpoint import TokenEndpoint
from cl_tokens._http import Answer, error_for, loads_json

ACCESS = "eyJhbGciOiJSUzUxMiJ9.eyJzY29wZSI6Im1hcmtldDphbGwifQ.c2lnbmF0dXJl"


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def _answer(body: bytes) -> tuple[TokenError | Token, int]:
    """What a manager makes of a 200 with ``body`` from a real server (3 attempts)."""
    reply = Reply(segments=[body], pause=0.0)
    async with (
        RawHTTPServer([reply]) as server,
        TokenManager(
            "id", "client-secret", auth_url=server.url, attempts=3, backoff_base=0.01
        ) as manager,
    ):
        try:
            return await manager.token(), len(server.requests)
        except TokenError as exc:
            return exc, len(server.requests)


def _body(**fields: Any) -> bytes:
    data = {"access_token": ACCESS, "token_type": "Bearer", "expires_in": 7200, **fields}
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("body", "fault"),
    [
        pytest.param(
            f'{{"access_token": "{ACCESS}", "expires_in": 7200, "x": {_nested(1000)}}}'.encode(),
            "nested deeper than 64",
            id="1000-deep",
        ),
        pytest.param(_nested(100_000).encode()[:60_000], "nested deeper", id="deep-unterminated"),
        pytest.param(
            f'{{"access_token": "{ACCESS}", "expires_in": {"9" * 400}}}'.encode(),
            "expires_in",
            id="400-digit-expires_in",
        ),
        pytest.param(_body(expires_in=1e12), "expires_in", id="expires_in-1e12"),
        pytest.param(_body(expires_in=0.5), "expires_in", id="expires_in-half-second"),
        pytest.param(_body(expires_in=366 * 86400), "expires_in", id="expires_in-366-days"),
        pytest.param(_body(expires_in="Infinity"), "expires_in", id="expires_in-text-infinity"),
        pytest.param(
            f'{{"access_token": "{ACCESS}", "expires_in": NaN}}'.encode(), "NaN", id="NaN"
        ),
        pytest.param(
            f'{{"access_token": "{ACCESS}", "expires_in": Infinity}}'.encode(),
            "not JSON",
            id="Infinity",
        ),
        pytest.param(b"\xff\xfe{}", "not JSON", id="not-utf8"),
    ],
)
async def test_a_hostile_200_is_a_malformed_answer_naming_the_fault(
    body: bytes, fault: str
) -> None:
    outcome, requests = await _answer(body)
    assert isinstance(outcome, TokenEndpointError), outcome
    assert fault in str(outcome)
    assert outcome.status == 200
    assert requests == 1  # a malformed 200 is a server bug: not retried


async def test_expires_in_at_the_bounds_is_accepted() -> None:
    for seconds in (1, 365 * 86400):
        outcome, _ = await _answer(_body(expires_in=seconds))
        assert isinstance(outcome, Token)
        assert outcome.lifetime == seconds


_BIG = "A" * 100_000
_LONG = "A" * 20_000  # over the 16 KB token bound, under the 64 KB body cap
INJECTIONS = [
    pytest.param(
        {"access_token": "abc\r\nX-Injected: yes"}, "access_token", "X-Injected", id="crlf"
    ),
    pytest.param({"access_token": "abc def"}, "access_token", "abc def", id="space"),
    pytest.param({"access_token": "jeton-d’accès"}, "access_token", "jeton", id="non-ascii"),
    pytest.param({"access_token": ""}, "access_token", None, id="empty"),
    pytest.param({"access_token": _BIG}, "64 KB cap", "AAAAAAAA", id="100-KB"),
    pytest.param({"access_token": _LONG}, "access_token", "AAAAAAAA", id="20-KB"),
    pytest.param({"token_type": "Basic"}, "token_type", "Basic", id="basic"),
    pytest.param(
        {"token_type": "Bearer\r\nX-Injected: yes"}, "token_type", "X-Injected", id="crlf-type"
    ),
]


@pytest.mark.parametrize(("fields", "named", "value"), INJECTIONS)
async def test_an_injected_token_value_is_a_token_error_that_never_quotes_it(
    fields: dict[str, str], named: str, value: str | None
) -> None:
    reply = Reply.json({**json.loads(_body()), **fields})
    async with (
        RawHTTPServer([reply]) as server,
        TokenManager("id", "client-secret", auth_url=server.url, attempts=3) as manager,
    ):
        with pytest.raises(TokenEndpointError) as info:
            await manager.header()
        with pytest.raises(TokenEndpointError):
            await manager.header()  # nothing bad was cached either
        assert len(server.requests) == 2  # one per call: never retried, never cached
    assert named in str(info.value)
    assert info.value.status == 200
    assert not info.value.retryable
    if value is not None:
        assert value not in str(info.value)


# -- properties: the parsing boundary, for any body ------------------------------------

_ENDPOINT = TokenEndpoint(
    auth_url="https://auth.commercelayer.io/oauth/token",
    client_id="id",
    client_secret="client-secret",
    body_encoding="json",
    clock=SystemClock(),
    session=None,  # type: ignore[arg-type]  # never called: only the parsing is tested
    user_agent="test",
)

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_token_fields = st.fixed_dictionaries(
    {},
    optional={
        "access_token": _json | st.text(min_size=1),
        "expires_in": _json | st.floats(0.5, 4e7) | st.text(max_size=500),
        "token_type": _json | st.sampled_from(["Bearer", "bearer", "Basic", "Bearer\n"]),
        "scope": _json,
        "created_at": _json,
    },
)


def _to_bytes(data: Any) -> bytes:
    return json.dumps(data, allow_nan=True).encode()


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=200)
    | _json.map(_to_bytes)
    | _token_fields.map(_to_bytes)
    | st.integers(1, 3000).map(lambda depth: _nested(depth).encode())
)
def test_any_200_body_is_a_token_or_a_malformed_answer(body: bytes) -> None:
    try:
        token = _ENDPOINT._token_from(Answer(200, "application/json", body, None), None, 0.0)
    except TokenEndpointError as exc:
        error = exc
    else:
        assert 1 <= token.lifetime <= 365 * 86400
        assert token.authorization.startswith("Bearer ")
        return
    assert error.status == 200
    assert not error.retryable
    assert len(str(error)) < 300


@settings(max_examples=150, deadline=None)
@given(
    status=st.sampled_from([400, 401, 403, 429, 500, 503, 418]),
    body=st.binary(max_size=200)
    | _json.map(_to_bytes)
    | st.fixed_dictionaries({"errors": st.lists(st.dictionaries(st.text(max_size=8), _json))}).map(
        _to_bytes
    )
    | st.integers(1, 3000).map(lambda depth: _nested(depth).encode()),
    retry_after=st.none() | st.text(max_size=40),
)
def test_any_error_body_is_a_token_error_of_bounded_escaped_text(
    status: int, body: bytes, retry_after: str | None
) -> None:
    error = error_for(
        Answer(status, "application/json", body, retry_after),
        what="token endpoint",
        action="token request",
        redact=lambda text: text,
        now=0.0,
    )
    assert isinstance(error, TokenError)
    assert str(error).isprintable()
    assert len(str(error)) < 1000


@given(depth=st.integers(1, 5000))
def test_loads_json_never_raises_anything_but_value_error(depth: int) -> None:
    try:
        loads_json(_nested(depth))
    except ValueError:
        assert depth > 64
    else:
        assert depth <= 64
