"""Customer tokens: logins, renewals with single-use refresh tokens, logout.

Against the fake server's customer grants, whose refresh tokens are single-use: a reused
one is answered 401 invalid_grant and counted in ``refresh_reuses``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis_support import RedisServer

from cl_tokens import (
    AuthenticationError,
    ConfigurationError,
    LoginRequiredError,
    TokenManager,
    create_assertion,
)
from cl_tokens.backends import MemoryBackend
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"
WORKER = str(Path(__file__).with_name("customer_worker.py"))


def manager_for(server: FakeAuthServer, **options: Any) -> TokenManager:
    return TokenManager(server.client_id, SECRET, auth_url=server.url, **options)


async def test_login_then_header_for_the_customer_is_served_warm(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cl_tokens")
    async with FakeAuthServer(client_secret=SECRET) as server:
        owner = server.customers.add("ann@example.com", "pw-123456")
        async with manager_for(server) as manager:
            token = await manager.login("ann@example.com", "pw-123456")
            assert token.owner_id == owner
            assert token.refresh_token
            assert token.refresh_token not in repr(token)
            header = await manager.header(customer=owner)
            assert header == {"Authorization": f"Bearer {token.access_token}"}
            for _ in range(100):
                assert await manager.header(customer=owner) == header
            # The app's own token is another key, untouched by the customer's.
            app = await manager.header()
            assert app != header
        assert server.customers.refresh_requests == 0
    assert token.refresh_token not in caplog.text
    assert "pw-123456" not in caplog.text


async def test_a_wrong_password_is_an_authentication_error() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        server.customers.add("ann@example.com", "right-password")
        async with manager_for(server) as manager:
            with pytest.raises(AuthenticationError) as caught:
                await manager.login("ann@example.com", "wrong-password")
            assert "wrong-password" not in str(caught.value)
            assert caught.value.status == 401


async def test_the_token_is_renewed_with_the_refresh_token_ahead_of_expiry() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        server.customers.expires_in = 4  # margin 1 s, window 2 s
        owner = server.customers.add("ann@example.com", "pw-123456")
        async with manager_for(server) as manager:
            first = await manager.login("ann@example.com", "pw-123456")
            seen = set()
            end = time.time() + 5
            while time.time() < end:
                token = await manager.token(customer=owner)
                assert time.time() < token.expires_at - 1.0  # never inside its margin
                seen.add(token.access_token)
                await asyncio.sleep(0.05)
        assert first.access_token in seen
        assert len(seen) >= 2
        assert server.customers.refresh_requests >= 1
        assert server.customers.refresh_reuses == 0


async def test_nothing_cached_for_a_customer_is_login_required() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server, manager_for(server) as manager:
        with pytest.raises(LoginRequiredError) as caught:
            await manager.header(customer="nobody-123")
        assert caught.value.owner_id == "nobody-123"
        assert server.token_requests == 0


async def test_a_refused_refresh_token_is_login_required() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        owner = server.customers.add("ann@example.com", "pw-123456")
        async with manager_for(server) as manager:
            token = await manager.login("ann@example.com", "pw-123456")
            assert token.refresh_token is not None
            server.customers.revoke(token.refresh_token)  # spent elsewhere, or revoked
            await manager.invalidate(token.access_token, customer=owner)
            with pytest.raises(LoginRequiredError) as caught:
                await manager.header(customer=owner)
            assert caught.value.owner_id == owner
            assert token.refresh_token not in str(caught.value)


async def test_a_second_process_uses_the_pair_the_first_rotated_instead_of_logging_out() -> None:
    """Two managers share a store; each holds the customer's pair in memory. The first
    renews (the server rotates the refresh token); the second, renewing later, must use
    the stored new pair, never its own spent one."""
    async with FakeAuthServer(client_secret=SECRET) as server:
        owner = server.customers.add("ann@example.com", "pw-123456")
        shared = MemoryBackend()
        first = manager_for(server, backend=shared)
        second = manager_for(server, backend=shared)
        token = await first.login("ann@example.com", "pw-123456")
        assert (await second.token(customer=owner)) == token  # from the store
        await first.invalidate(token.access_token, customer=owner)
        renewed = await first.token(customer=owner)
        assert renewed.access_token != token.access_token
        await second.invalidate(token.access_token, customer=owner)
        again = await second.token(customer=owner)
        assert again.access_token == renewed.access_token  # read back: no renewal needed
        await second.invalidate(again.access_token, customer=owner)
        third = await second.token(customer=owner)
        assert third.access_token not in (token.access_token, renewed.access_token)
        assert server.customers.refresh_requests == 2
        assert server.customers.refresh_reuses == 0
        await first.aclose()
        await second.aclose()


async def test_logout_revokes_at_the_server_and_forgets_the_customer() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        owner = server.customers.add("ann@example.com", "pw-123456")
        async with manager_for(server) as manager:
            token = await manager.login("ann@example.com", "pw-123456")
            assert await manager.logout(owner)
            assert server.revoke_requests == 2
            assert token.access_token in server.revoked
            assert token.refresh_token in server.revoked
            with pytest.raises(LoginRequiredError):
                await manager.header(customer=owner)
            assert not await manager.logout(owner)


async def test_login_as_uses_a_js_auth_assertion_and_renews() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        server.customers.expires_in = 4
        async with manager_for(server) as manager:
            token = await manager.login_as("cust-42", claims={"tier": "gold"})
            assert token.owner_id == "cust-42"
            await manager.invalidate(token.access_token, customer="cust-42")
            renewed = await manager.token(customer="cust-42")
            assert renewed.access_token != token.access_token
        assert server.customers.refresh_reuses == 0


def test_create_assertion_is_hs512_with_the_claims_under_commerce_layers_namespace() -> None:
    assertion = create_assertion(owner_id="cust-1", owner_type="User", claims={"a": 1})
    head, body, signature = assertion.split(".")

    def decode(part: str) -> Any:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))

    assert decode(head) == {"alg": "HS512", "typ": "JWT"}
    claims = decode(body)["https://commercelayer.io/claims"]
    assert claims == {"owner": {"type": "User", "id": "cust-1"}, "custom_claim": {"a": 1}}
    expected = hmac.new(b"cl", f"{head}.{body}".encode(), hashlib.sha512).digest()
    assert base64.urlsafe_b64decode(signature + "==") == expected
    with pytest.raises(ConfigurationError, match="4096"):
        create_assertion(owner_id="c", claims={"x": "y" * 5000})
    with pytest.raises(ConfigurationError, match="owner_type"):
        create_assertion(owner_id="c", owner_type="Admin")


async def test_exchange_code_caches_per_owner() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        owner = server.customers.add("ann@example.com", "pw")
        code = server.customers.issue_code(owner, "https://shop.example.com/cb")
        async with manager_for(server) as manager:
            with pytest.raises(AuthenticationError):
                await manager.exchange_code("wrong", "https://shop.example.com/cb")
            token = await manager.exchange_code(code, "https://shop.example.com/cb")
            assert token.owner_id == owner
            assert (await manager.token(customer=owner)) == token


async def test_refresh_tokens_are_not_stored_in_clear_without_permission(tmp_path: Path) -> None:
    directory = tmp_path / "tokens"
    async with FakeAuthServer(client_secret=SECRET) as server:
        server.customers.add("ann@example.com", "pw")
        async with manager_for(server, backend=f"file://{directory}") as manager:
            with pytest.raises(ConfigurationError, match="CL_TOKEN_ENCRYPTION_KEY"):
                await manager.login("ann@example.com", "pw")
        assert server.token_requests == 0
        options: dict[str, Any] = {"allow_plaintext_refresh_tokens": True}
        async with manager_for(server, backend=f"file://{directory}", **options) as manager:
            token = await manager.login("ann@example.com", "pw")
            assert token.refresh_token is not None
        pytest.importorskip("cryptography")
        from cryptography.fernet import Fernet

        key = Fernet.generate_key()
        async with manager_for(server, backend=f"file://{directory}", encryption_key=key) as m:
            token = await m.login("ann@example.com", "pw")
        assert token.refresh_token is not None
        stored = b"".join(p.read_bytes() for p in directory.iterdir() if p.is_file())
        assert token.refresh_token.encode() not in stored


async def test_memory_is_bounded_by_max_customers() -> None:
    async with FakeAuthServer(client_secret=SECRET) as server:
        owners = [server.customers.add(f"c{n}@example.com", "pw") for n in range(30)]
        async with manager_for(server, max_customers=10) as manager:
            for n in range(30):
                await manager.login(f"c{n}@example.com", "pw")
            assert len(manager._pairs) == 10
            assert set(manager._pairs) == {manager._resolve((None, o))[0] for o in owners[20:]}
            # An evicted customer is still in the (private memory) store: served from it.
            assert (await manager.token(customer=owners[0])).owner_id == owners[0]


class GatedLocks(MemoryBackend):
    """A store whose lock is granted only once ``gate`` opens: a renewal's flight waits
    there, after it resolved its key and before it chose its grant."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def get_or_lock(self, key: str, *, lease: float, refuse: str | None = None) -> Any:
        await self.gate.wait()
        return await super().get_or_lock(key, lease=lease, refuse=refuse)


async def test_a_customer_evicted_during_its_renewal_never_gets_the_apps_token() -> None:
    """The flight carries its owner: evicting the customer meanwhile (max_customers)
    cannot turn the renewal into a client_credentials fetch stored under their key."""
    async with FakeAuthServer(client_secret=SECRET) as server:
        ann = server.customers.add("ann@example.com", "pw")
        server.customers.add("bob@example.com", "pw")
        backend = GatedLocks()
        backend.gate.set()
        async with manager_for(server, backend=backend, max_customers=1) as manager:
            first = await manager.login("ann@example.com", "pw")
            await manager.invalidate(first.access_token, customer=ann)
            backend.gate.clear()
            renewal = asyncio.create_task(manager.token(customer=ann))
            await asyncio.sleep(0.05)  # the flight waits at the gate
            await manager.login("bob@example.com", "pw")  # evicts ann from memory
            assert ann not in {t.owner_id for t in manager._pairs.values()}
            backend.gate.set()
            renewed = await renewal
            assert renewed.owner_id == ann
            assert renewed.access_token != first.access_token
            assert (await manager.header(customer=ann))["Authorization"] == (
                f"Bearer {renewed.access_token}"
            )
        grants = [r.body.get("grant_type") for r in server.requests if r.path.endswith("/token")]
        assert "client_credentials" not in grants
        assert server.customers.refresh_reuses == 0


async def test_a_login_during_a_customers_miss_flight_serves_later_callers_at_once() -> None:
    """A caller that would join a customer's miss-flight by its argument alone is served
    the token a login installs meanwhile, at once, instead of waiting on that flight
    (the install serves every argument waiting on the key hot, and forgets the flight's
    aliases). The explicit scope, the manager's default, names the same key as the
    login's argument but is not the argument the login itself serves."""
    scope = "market:code:europe"
    async with FakeAuthServer(client_secret=SECRET) as server:
        ann = server.customers.add("ann@example.com", "pw")
        backend = GatedLocks()
        async with manager_for(server, backend=backend, scope=scope) as manager:
            early = asyncio.create_task(manager.header(scope, customer=ann))  # at the gate
            await asyncio.sleep(0.05)
            assert (scope, ann) in manager._flights._aliases  # joinable by argument so far
            logged_in = await manager.login("ann@example.com", "pw")
            # Not behind the gate: the login's token, at once.
            later = await asyncio.wait_for(manager.header(scope, customer=ann), timeout=2.0)
            assert later == {"Authorization": f"Bearer {logged_in.access_token}"}
            backend.gate.set()
            outcome = (await asyncio.gather(early, return_exceptions=True))[0]
            # The early caller's flight finds the stored pair, or nothing to renew.
            assert outcome == later or isinstance(outcome, LoginRequiredError)


async def test_unknown_customers_leave_no_state_behind() -> None:
    """header(customer=...) for ids nobody logged in (a route's hostile input) raises
    LoginRequiredError and keeps nothing per id once the idle state is forgotten."""
    async with FakeAuthServer(client_secret=SECRET) as server, manager_for(server) as manager:
        for n in range(200):
            with pytest.raises(LoginRequiredError):
                await manager.header(customer=f"nobody-{n}")
        manager._forget_idle()
        assert not manager._keys
        assert not manager._owners
        assert not manager._pairs
        assert server.token_requests == 0


# -- a fleet at the refresh moment ---------------------------------------------------------


@pytest.fixture(params=["file", "redis"])
def fleet_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        directory = tmp_path / "tokens"
        directory.mkdir(mode=0o700)
        return f"file://{directory}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.mark.slow
async def test_16_processes_renew_one_customer_with_exactly_one_refresh_and_no_reuse(
    fleet_store: str,
) -> None:
    pytest.importorskip("cryptography")
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    async with FakeAuthServer(client_secret=SECRET) as server:
        server.customers.expires_in = 16  # margin 4 s: every caller below must wait
        owner = server.customers.add("ann@example.com", "pw-123456")
        async with manager_for(server, backend=fleet_store, encryption_key=key) as manager:
            first = await manager.login("ann@example.com", "pw-123456")
        start_at = first.expires_at - 3.0  # inside the margin: the old token is unusable
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                WORKER,
                server.url,
                fleet_store,
                owner,
                key,
                str(start_at),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            for _ in range(16)
        ]
        headers: set[str] = set()
        served = 0
        for worker in workers:
            out, err = await asyncio.wait_for(worker.communicate(), 90)
            assert worker.returncode == 0, err.decode()[-2000:]
            result = json.loads(out.decode().strip().splitlines()[-1])
            headers.update(result["headers"])
            served += result["served"]
        print(
            f"\n16 x 100 at the refresh moment, {fleet_store.split(':')[0]}: "
            f"{server.customers.refresh_requests} refresh request(s), "
            f"{server.customers.refresh_reuses} reuse(s)"
        )
        assert server.customers.refresh_requests == 1
        assert server.customers.refresh_reuses == 0
        assert served == 1600
        assert len(headers) == 1
        assert headers != {f"Bearer {first.access_token}"}


async def test_the_middleware_sends_the_customers_token_and_renews_it_on_a_401() -> None:
    import aiohttp

    async with FakeAuthServer(client_secret=SECRET) as server:
        owner = server.customers.add("ann@example.com", "pw-123456")
        async with manager_for(server) as manager:
            token = await manager.login("ann@example.com", "pw-123456")
            middleware = manager.aiohttp_middleware(customer=owner)
            async with aiohttp.ClientSession(middlewares=(middleware,)) as http:
                api = f"{server.url.rsplit('/oauth', 1)[0]}/api/orders"
                async with http.get(api) as r:
                    assert r.status == 200  # the customer's token is live at the API
                server.revoked.add(token.access_token)  # the API now answers 401
                async with http.get(api) as r:
                    assert r.status == 200  # invalidated, renewed, sent again
                assert server.api_requests == 3
                renewed = await manager.token(customer=owner)
                assert renewed.access_token != token.access_token
        assert server.customers.refresh_requests == 1
        assert server.customers.refresh_reuses == 0
