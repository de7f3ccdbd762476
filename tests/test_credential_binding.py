"""Keys and stored values are bound to the credentials (security issue, items 1 and 7).

Against every backend a manager can share (one MemoryBackend instance, a directory, a
Redis database): a manager with a wrong or missing secret never receives the real
credentials' token, and a value written without the secret's MAC is never served.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_support import RedisServer

from cl_tokens import AuthenticationError, Token, TokenManager
from cl_tokens._keys import KEY_PREFIX, cache_key, credential_keys, encode_parts
from cl_tokens.backends import MemoryBackend, TokenBackend, backend_from_url
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"

BackendFactory = Callable[[], TokenBackend]


@pytest.fixture(params=["memory", "file", "redis"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BackendFactory]:
    """A factory of backends that all see the same store."""
    if request.param == "memory":
        one = MemoryBackend()
        yield lambda: one
        return
    if request.param == "file":
        directory = tmp_path / "tokens"
        yield lambda: backend_from_url(f"file://{directory}")
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield lambda: backend_from_url(server.url)


async def test_a_wrong_or_missing_secret_never_gets_the_real_token(
    shared: BackendFactory,
) -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        real = TokenManager(server.client_id, SECRET, auth_url=server.url, backend=shared())
        token = await real.token()
        assert server.token_requests == 1
        for wrong in ("not-the-secret", None):
            attacker = TokenManager(
                server.client_id, wrong, auth_url=server.url, backend=shared(), attempts=1
            )
            with pytest.raises(AuthenticationError) as caught:
                await attacker.header()
            assert caught.value.status == 401
            await attacker.aclose()
        # Each attacker sent its own request and got the server's 401.
        assert server.token_requests == 3
        assert (await real.token()) == token
        await real.aclose()


async def test_a_planted_value_without_the_mac_is_never_served(
    shared: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        key = cache_key(server.url, server.client_id, None, SECRET)
        planter = shared()
        planted = Token("planted-token", "Bearer", None, time.time() + 7200, lifetime=7200)
        await planter.set(key, planted)
        caplog.set_level(logging.WARNING, logger="cl_tokens")
        async with TokenManager(
            server.client_id, SECRET, auth_url=server.url, backend=shared()
        ) as manager:
            assert (await manager.token()).access_token == server.issued[0]
            assert server.token_requests == 1
        forged = [r for r in caplog.records if "does not carry its MAC" in r.getMessage()]
        assert len(forged) == 1
        assert "planted-token" not in caplog.text
        await planter.aclose()


@pytest.mark.parametrize("field", ["access_token", "expires_at", "scope", "seal"])
async def test_an_altered_sealed_value_is_a_miss(shared: BackendFactory, field: str) -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        key = cache_key(server.url, server.client_id, None, SECRET)
        store = shared()
        async with TokenManager(
            server.client_id, SECRET, auth_url=server.url, backend=store
        ) as first:
            await first.token()
        sealed = await store.get(key)
        assert sealed is not None
        assert sealed.seal is not None
        changes: dict[str, object] = {
            "access_token": sealed.access_token[:-1]
            + ("A" if sealed.access_token[-1] != "A" else "B"),
            "expires_at": sealed.expires_at + 3600,
            "scope": "market:code:other",
            "seal": ("0" if sealed.seal[0] != "0" else "1") + sealed.seal[1:],
        }
        await store.set(key, dataclasses.replace(sealed, **{field: changes[field]}))
        async with TokenManager(
            server.client_id, SECRET, auth_url=server.url, backend=shared()
        ) as second:
            await second.token()
        assert server.token_requests == 2
        await store.aclose()


async def test_sealed_values_are_shared_by_the_same_credentials(shared: BackendFactory) -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        managers = [
            TokenManager(server.client_id, SECRET, auth_url=server.url, backend=shared())
            for _ in range(3)
        ]
        tokens = {(await m.token()).access_token for m in managers}
        assert tokens == {server.issued[0]}
        assert server.token_requests == 1
        for m in managers:
            await m.aclose()


def test_the_x1f_aliasing_of_the_old_key_is_gone() -> None:
    url = "https://auth.example.com/oauth/token"
    assert cache_key(url, "A", "B\x1fmarket:code:eu", "s") != cache_key(
        url, "A\x1fB", "market:code:eu", "s"
    )
    assert cache_key(url, "A", "B\x1fmarket:code:eu") != cache_key(url, "A\x1fB", "market:code:eu")


def test_a_key_shows_neither_the_secret_nor_the_client_id() -> None:
    key = cache_key("https://auth.example.com/oauth/token", "my-client-id", "m", "my-secret-value")
    assert key.startswith(KEY_PREFIX)
    assert "my-client-id" not in key
    assert "my-secret-value" not in key
    assert len(key) == len(KEY_PREFIX) + 64


def test_secret_and_no_secret_keys_never_meet() -> None:
    url = "https://auth.example.com/oauth/token"
    keys = {cache_key(url, "c", "s", secret) for secret in (None, "a", "b", "aa")}
    assert len(keys) == 4


def test_credential_keys_repr_has_no_secret() -> None:
    keys = credential_keys("https://auth.example.com/oauth/token", "cid", "the-secret-value")
    assert "the-secret-value" not in repr(keys)
    assert keys.authenticated
    assert not credential_keys("https://auth.example.com/oauth/token", "cid", None).authenticated


parts = st.one_of(st.none(), st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(a=st.tuples(parts, parts, parts), b=st.tuples(parts, parts, parts))
def test_the_key_encoding_is_injective(
    a: tuple[str | None, ...], b: tuple[str | None, ...]
) -> None:
    if a != b:
        assert encode_parts(*a) != encode_parts(*b)


@settings(max_examples=20, deadline=None)
@given(client=st.text(min_size=1, max_size=10), scope=st.one_of(st.none(), st.text(max_size=10)))
def test_keys_differ_when_any_part_differs(client: str, scope: str | None) -> None:
    url = "https://auth.example.com/oauth/token"
    base = cache_key(url, client, scope, "secret")
    assert cache_key(url, client + "x", scope, "secret") != base
    assert cache_key(url, client, (scope or "") + "x", "secret") != base
    assert cache_key(url + "x", client, scope, "secret") != base
    assert cache_key(url, client, scope, "secret2") != base
