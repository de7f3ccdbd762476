"""JWKSVerifier against a real local JWKS endpoint, with tokens signed here (RS512)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from raw_http import RawHTTPServer, Reply

from cl_tokens import ConfigurationError, Token, TokenError
from cl_tokens._jwks import JWKSVerifier


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "RSA",
        "use": "sig",
        "alg": "RS512",
        "kid": kid,
        "n": _b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": _b64(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
    }


def sign(
    payload: dict[str, Any], key: rsa.RSAPrivateKey, kid: str = "k1", alg: str = "RS512"
) -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(payload).encode())
    signature = key.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA512())
    return f"{header}.{body}.{_b64(signature)}"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Issuer:
    url: str
    keys: list[dict[str, str]]
    fetches: int = 0
    raw: bytes | None = None  # sent instead of {"keys": keys} when set

    def claims(self, **extra: Any) -> dict[str, Any]:
        return {"iss": self.url, "exp": time.time() + 3600, "scope": "market:all", **extra}


@pytest.fixture
async def issuer(key: rsa.RSAPrivateKey) -> AsyncIterator[Issuer]:
    state = Issuer(url="", keys=[_jwk(key, "k1")])

    async def jwks(request: web.Request) -> web.Response:
        state.fetches += 1
        if state.raw is not None:
            return web.Response(body=state.raw, content_type="application/json")
        return web.json_response({"keys": state.keys})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    await runner.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return self.now


async def test_good_signature_verifies_and_keys_are_cached(
    issuer: Issuer, key: rsa.RSAPrivateKey
) -> None:
    access = sign(issuer.claims(), key)
    async with JWKSVerifier(issuers=[issuer.url]) as verifier:
        payload = await verifier.verify(access)
        token = Token(access_token=access, token_type="Bearer", scope=None, expires_at=2e9)
        assert await verifier.verify(token) == payload
    assert payload["iss"] == issuer.url
    assert payload["scope"] == "market:all"
    assert issuer.fetches == 1


async def test_tampered_payload_is_rejected(issuer: Issuer, key: rsa.RSAPrivateKey) -> None:
    header, _, signature = sign(issuer.claims(), key).split(".")
    forged = _b64(json.dumps(issuer.claims(scope="market:everything")).encode())
    access = f"{header}.{forged}.{signature}"
    async with JWKSVerifier(issuers=[issuer.url]) as verifier:
        with pytest.raises(TokenError, match="signature") as caught:
            await verifier.verify(access)
    assert access not in str(caught.value)


async def test_signature_by_another_key_is_rejected(
    issuer: Issuer, other_key: rsa.RSAPrivateKey
) -> None:
    async with JWKSVerifier(issuers=[issuer.url]) as verifier:
        with pytest.raises(TokenError, match="signature"):
            await verifier.verify(sign(issuer.claims(), other_key, kid="k1"))


async def test_unknown_kid_is_rejected_and_refetched_at_most_every_30_s(
    issuer: Issuer, key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    clock = FakeClock()
    rotated = sign(issuer.claims(), other_key, kid="k2")
    async with JWKSVerifier(issuers=[issuer.url], clock=clock) as verifier:
        await verifier.verify(sign(issuer.claims(), key))
        with pytest.raises(TokenError, match="no key 'k2'"):
            await verifier.verify(rotated)
        assert issuer.fetches == 1  # fetched moments ago: no second request
        issuer.keys.append(_jwk(other_key, "k2"))  # the issuer rotates its keys
        clock.now += 31
        assert (await verifier.verify(rotated))["iss"] == issuer.url
    assert issuer.fetches == 2


async def test_untrusted_issuer_is_rejected_without_fetching(
    issuer: Issuer, key: rsa.RSAPrivateKey
) -> None:
    async with JWKSVerifier() as verifier:  # trusts only https://auth.commercelayer.io
        with pytest.raises(TokenError, match="not trusted"):
            await verifier.verify(sign(issuer.claims(), key))
    assert issuer.fetches == 0


async def test_expired_token_is_rejected(issuer: Issuer, key: rsa.RSAPrivateKey) -> None:
    access = sign(issuer.claims(exp=time.time() - 5), key)
    async with JWKSVerifier(issuers=[issuer.url]) as verifier:
        with pytest.raises(TokenError, match="expired"):
            await verifier.verify(access)
        leeway = JWKSVerifier(issuers=[issuer.url], leeway=60, session=verifier._session)
        assert (await leeway.verify(access))["iss"] == issuer.url
        await leeway.aclose()


@pytest.mark.parametrize("alg", ["none", "HS512", "RS256"])
async def test_other_algorithms_are_refused(
    issuer: Issuer, key: rsa.RSAPrivateKey, alg: str
) -> None:
    async with JWKSVerifier(issuers=[issuer.url]) as verifier:
        with pytest.raises(TokenError, match="only RS512"):
            await verifier.verify(sign(issuer.claims(), key, alg=alg))
    assert issuer.fetches == 0


@pytest.mark.parametrize("access", ["opaque", "a.b", "!!.??.##", "e30.W10.c2ln"])
async def test_not_a_jwt_is_a_token_error(access: str) -> None:
    async with JWKSVerifier() as verifier:
        with pytest.raises(TokenError, match="not a JWT"):
            await verifier.verify(access)


async def test_unreachable_jwks_is_a_token_error(key: rsa.RSAPrivateKey) -> None:
    url = "http://127.0.0.1:9"  # the discard port: nothing listens
    claims = {"iss": url, "exp": time.time() + 60}
    async with JWKSVerifier(issuers=[url]) as verifier:
        with pytest.raises(TokenError, match="could not fetch"):
            await verifier.verify(sign(claims, key))


def test_issuers_must_be_https_or_loopback() -> None:
    with pytest.raises(ConfigurationError, match="https"):
        JWKSVerifier(issuers=["http://auth.example.com"])
    with pytest.raises(ConfigurationError):
        JWKSVerifier(issuers="https://auth.commercelayer.io")


# -- hostile tokens and key sets: a TokenError, never another exception ------------------


def _segment(text: str) -> str:
    return _b64(text.encode())


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


_RS512 = _segment(json.dumps({"alg": "RS512", "kid": "k"}))


@pytest.mark.parametrize(
    "access",
    [
        pytest.param(_segment(_nested(1000)) + ".e30.c2ln", id="1000-deep-header"),
        pytest.param(
            _RS512 + "." + _segment('{"x": ' + _nested(1000) + "}") + ".c2ln",
            id="1000-deep-payload",
        ),
        pytest.param(_segment('{"alg": NaN}') + ".e30.c2ln", id="NaN"),
        pytest.param("e30." * 2 + "c2ln" + "A" * 70_000, id="70-KB"),
    ],
)
async def test_a_hostile_token_is_a_token_error(access: str) -> None:
    async with JWKSVerifier() as verifier:
        with pytest.raises(TokenError):
            await verifier.verify(access)


async def test_a_huge_or_nan_exp_is_a_token_error_without_fetching(
    issuer: Issuer, key: rsa.RSAPrivateKey
) -> None:
    header = _segment(json.dumps({"alg": "RS512", "kid": "k1"}))
    async with JWKSVerifier(issuers=[issuer.url]) as verifier:
        for exp in ("9" * 400, "1e999", '"soon"', "true"):
            payload = _segment(f'{{"iss": "{issuer.url}", "exp": {exp}}}')
            with pytest.raises(TokenError, match="exp"):
                await verifier.verify(f"{header}.{payload}.c2ln")
    assert issuer.fetches == 0


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(('{"keys": ' + _nested(1000) + "}").encode(), id="1000-deep"),
        pytest.param(b'{"keys": [{"kty": "RSA", "kid": "k1", "n": NaN, "e": "AQAB"}]}', id="NaN"),
        pytest.param(b'{"keys": "' + b"x" * 70_000 + b'"}', id="70-KB"),
        pytest.param(
            b'{"keys": [{"kty": "RSA", "kid": "k1", "n": "!!", "e": "AQAB"}]}', id="junk-n"
        ),
        pytest.param(b'{"keys": [{"kty": "RSA", "kid": "k1", "n": "AA", "e": "AA"}]}', id="zero-n"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
async def test_a_hostile_key_set_is_a_token_error(
    issuer: Issuer, key: rsa.RSAPrivateKey, raw: bytes
) -> None:
    issuer.raw = raw
    async with JWKSVerifier(issuers=[issuer.url]) as verifier:
        with pytest.raises(TokenError) as info:
            await verifier.verify(sign(issuer.claims(), key))
    assert len(str(info.value)) < 300


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.text(max_size=60)
        | st.binary(max_size=60).map(_b64)
        | st.text(max_size=60).map(_segment)
        | st.integers(1, 2000).map(lambda depth: _segment(_nested(depth))),
        min_size=1,
        max_size=4,
    )
)
def test_any_string_is_a_payload_or_a_token_error(parts: list[str]) -> None:
    async def verify() -> None:
        # Trusts only a loopback issuer nobody names: no key set is ever fetched.
        async with JWKSVerifier(issuers=["http://127.0.0.1:9"]) as verifier:
            with pytest.raises(TokenError) as info:
                await verifier.verify(".".join(parts))
        assert str(info.value).isprintable()
        assert len(str(info.value)) < 400

    asyncio.run(verify())


# -- single flight and the remembered failure ------------------------------------------


async def test_eight_verifies_against_a_hung_key_set_send_one_request_and_fail_together(
    key: rsa.RSAPrivateKey,
) -> None:
    clock = FakeClock()
    async with RawHTTPServer([Reply(hang=True)]) as server:
        claims = {"iss": server.base_url, "exp": time.time() + 600}
        async with JWKSVerifier(
            issuers=[server.base_url], timeout=1.0, failure_ttl=10, clock=clock
        ) as verifier:
            started = time.monotonic()
            results = await asyncio.gather(
                *(verifier.verify(sign(claims, key)) for _ in range(8)), return_exceptions=True
            )
            elapsed = time.monotonic() - started
            assert all(isinstance(r, TokenError) and "did not answer" in str(r) for r in results)
            assert len(server.requests) == 1
            # One timeout for all eight (before, they waited 1, 2 ... 8 timeouts in turn).
            assert elapsed < 5
            # Remembered: the next verify fails at once, and sends nothing.
            with pytest.raises(TokenError, match="remembered"):
                await asyncio.wait_for(verifier.verify(sign(claims, key)), 0.5)
            assert len(server.requests) == 1
            clock.now += 11  # failure_ttl has passed: one new attempt
            with pytest.raises(TokenError, match="did not answer"):
                await verifier.verify(sign(claims, key))
            assert len(server.requests) == 2


async def test_a_cancelled_verify_leaves_the_fetch_to_the_others(
    issuer: Issuer, key: rsa.RSAPrivateKey
) -> None:
    async with JWKSVerifier(issuers=[issuer.url]) as verifier:
        first = asyncio.create_task(verifier.verify(sign(issuer.claims(), key)))
        second = asyncio.create_task(verifier.verify(sign(issuer.claims(), key)))
        await asyncio.sleep(0)
        first.cancel()
        assert (await second)["iss"] == issuer.url
    assert issuer.fetches == 1


async def test_a_chunked_key_set_in_parts_verifies(key: rsa.RSAPrivateKey) -> None:
    keys = {"keys": [_jwk(key, "k1")]}
    async with RawHTTPServer([Reply.json(keys, parts=4, chunked=True)]) as server:
        claims = {"iss": server.base_url, "exp": time.time() + 600}
        async with JWKSVerifier(issuers=[server.base_url]) as verifier:
            assert (await verifier.verify(sign(claims, key)))["iss"] == server.base_url
