"""The core promises of TokenManager, over real HTTP against FakeAuthServer."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from cl_tokens import (
    AuthenticationError,
    ConfigurationError,
    Token,
    TokenEndpointError,
    TokenError,
    TokenManager,
)
from cl_tokens.backends import MemoryBackend
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"  # the one tests/conftest.py gives the server

MakeManager = Callable[..., TokenManager]


async def test_10000_concurrent_cold_callers_make_exactly_one_request(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    server.latency = 0.05
    manager = make_manager()
    headers = await asyncio.gather(*(manager.header() for _ in range(10_000)))
    assert server.token_requests == 1
    assert {h["Authorization"] for h in headers} == {f"Bearer {server.issued[0]}"}


async def test_a_cold_stampedes_waiters_join_the_flight_without_reading_the_tiers_again(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    # The first caller of each argument reads the tier and starts (or joins) the flight;
    # everyone after it joins by that argument alone, the cheapest way in.
    server.latency = 0.05
    manager = make_manager(scope="market:code:europe")
    reads = 0
    real_get = manager._tier.get

    def counted(key: str):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return real_get(key)

    manager._tier.get = counted  # type: ignore[method-assign]
    calls = [manager.header() for _ in range(3_000)]
    calls += [manager.header("market:code:europe") for _ in range(3_000)]
    calls += [manager.token() for _ in range(10)]
    results = await asyncio.gather(*calls)
    assert server.token_requests == 1
    assert reads == 2  # None and "market:code:europe": one key, two arguments
    assert {r["Authorization"] for r in results[:6_000]} == {f"Bearer {server.issued[0]}"}
    assert {t.access_token for t in results[6_000:]} == {server.issued[0]}  # type: ignore[union-attr]
    assert manager._flights._aliases == {}  # forgotten with the flight
    # A call after the flight reads the hot tier: no flight to join, no request.
    assert await manager.header() == results[0]
    assert server.token_requests == 1


async def test_warm_header_makes_no_request_and_returns_a_new_dict(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    first = await manager.header()
    second = await manager.header()
    assert first == second
    assert first is not second
    second["Authorization"] = "tampered"
    assert (await manager.header()) == first
    assert server.token_requests == 1


async def test_wrong_secret_raises_authentication_error_once_per_flight_without_the_secret(
    server: FakeAuthServer, make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cl_tokens")
    wrong = "wrong-secret-value-1234567"
    manager = make_manager(client_secret=wrong)
    results = await asyncio.gather(*(manager.header() for _ in range(100)), return_exceptions=True)
    assert server.token_requests == 1
    assert all(isinstance(r, AuthenticationError) for r in results)
    error = results[0]
    assert isinstance(error, AuthenticationError)
    assert error.status == 401
    assert error.code == "UNAUTHORIZED"
    assert error.title == "invalid_client"
    assert error.detail
    assert "Client authentication failed" in error.detail
    assert "Client authentication failed" in str(error)
    for text in [str(r) for r in results] + [caplog.text, repr(manager)]:
        assert wrong not in text
        assert SECRET not in text


async def test_invalidate_with_200_callers_holding_the_same_stale_token_fetches_once(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    stale = await manager.token()
    assert server.token_requests == 1

    async def saw_401() -> str:
        await manager.invalidate(stale.access_token)
        return (await manager.token()).access_token

    fresh = await asyncio.gather(*(saw_401() for _ in range(200)))
    assert server.token_requests == 2
    assert set(fresh) == {server.issued[1]}
    assert stale.access_token not in fresh


async def test_invalidate_leaves_a_newer_token_alone(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager()
    old = await manager.token()
    assert await manager.invalidate(old.access_token) is True
    new = await manager.token()
    assert await manager.invalidate(old.access_token) is False
    assert (await manager.token()) == new
    assert server.token_requests == 2


async def test_cancelling_the_first_caller_does_not_fail_the_others(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    server.latency = 0.2
    manager = make_manager()
    first = asyncio.create_task(manager.header())
    await asyncio.sleep(0.05)  # the flight has started on the first caller's behalf
    others = [asyncio.create_task(manager.header()) for _ in range(50)]
    await asyncio.sleep(0.01)
    first.cancel()
    results = await asyncio.gather(*others)
    assert first.cancelled()
    assert server.token_requests == 1
    assert len({r["Authorization"] for r in results}) == 1


async def test_a_fetch_whose_callers_all_left_still_caches_its_token(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    server.latency = 0.1
    manager = make_manager()
    caller = asyncio.create_task(manager.header())
    await asyncio.sleep(0.02)
    caller.cancel()
    await asyncio.sleep(0.2)
    await manager.header()
    assert server.token_requests == 1


async def test_a_failed_flight_reaches_every_waiter_then_backs_off(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager(attempts=1, backoff_base=0.2)
    server.fail_next(1, 500)
    results = await asyncio.gather(*(manager.header() for _ in range(20)), return_exceptions=True)
    assert server.token_requests == 1
    assert all(isinstance(r, TokenError) and "HTTP 500" in str(r) for r in results)
    # Within the back-off: failing fast, no request, and told when to come back.
    with pytest.raises(TokenEndpointError) as caught:
        await manager.header()
    assert server.token_requests == 1
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 0.2
    await asyncio.sleep(caught.value.retry_after + 0.01)
    assert (await manager.header())["Authorization"] == f"Bearer {server.issued[0]}"
    assert server.token_requests == 2


def _library_tasks() -> list[asyncio.Task[object]]:
    """Pending tasks running cl_tokens code (the fake server's own tasks excluded)."""
    found = []
    for task in asyncio.all_tasks():
        filename = getattr(task.get_coro(), "cr_code", None)
        path = filename.co_filename if filename is not None else ""
        if "cl_tokens" in path and "testing" not in path and not task.done():
            found.append(task)
    return found


async def test_aclose_leaves_no_task_pending(server: FakeAuthServer) -> None:
    server.latency = 0.5
    manager = TokenManager(server.client_id, SECRET, auth_url=server.url)
    waiter = asyncio.create_task(manager.header())
    await asyncio.sleep(0.05)
    await manager.aclose()
    with pytest.raises(TokenError, match="closed while this call waited"):
        await waiter
    await asyncio.sleep(0)
    assert _library_tasks() == []
    with pytest.raises(TokenError, match="closed"):
        await manager.header()


async def test_form_body_works_against_a_form_only_server() -> None:
    async with FakeAuthServer(body_encoding="form") as server:
        async with TokenManager(
            server.client_id, server.client_secret, auth_url=server.url, body_encoding="form"
        ) as manager:
            await manager.header()
        async with TokenManager(
            server.client_id, server.client_secret, auth_url=server.url
        ) as json_manager:
            with pytest.raises(AuthenticationError) as info:
                await json_manager.header()
    assert info.value.code == "invalid_request"
    form = server.requests[0]
    assert form.content_type == "application/x-www-form-urlencoded"
    assert form.body == {
        "grant_type": "client_credentials",
        "client_id": server.client_id,
        "client_secret": server.client_secret,
    }


async def test_json_body_has_the_documented_shape(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    manager = make_manager(scope="market:code:europe")
    await manager.header()
    request = server.requests[0]
    assert request.content_type == "application/json"
    assert request.body == {
        "grant_type": "client_credentials",
        "client_id": server.client_id,
        "client_secret": SECRET,
        "scope": "market:code:europe",
    }
    assert request.headers["Accept"] == "application/json"


async def test_sales_channel_credentials_send_no_secret() -> None:
    async with FakeAuthServer(client_secret=None, application_kind="sales_channel") as server:
        manager = TokenManager(server.client_id, auth_url=server.url)
        async with manager:
            token = await manager.token()
    assert "client_secret" not in server.requests[0].body
    assert token.claims is not None
    assert token.claims.application_kind == "sales_channel"


async def test_each_scope_has_its_own_entry_and_flight(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    server.latency = 0.05
    manager = make_manager(scope="market:code:europe")
    calls = [manager.token() for _ in range(100)]
    calls += [manager.token("market:code:usa") for _ in range(100)]
    tokens = await asyncio.gather(*calls)
    assert server.token_requests == 2
    assert {t.scope for t in tokens} == {"market:code:europe", "market:code:usa"}
    assert sorted(r.body["scope"] for r in server.requests) == [
        "market:code:europe",
        "market:code:usa",
    ]
    # The default scope named explicitly shares the default's entry.
    assert (await manager.token("market:code:europe")) == tokens[0]
    assert server.token_requests == 2


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.mono = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


async def test_an_expired_token_is_never_handed_out_and_a_new_one_is_fetched(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    import time

    clock = FakeClock(time.time())
    server.expires_in = 120  # margin 30 s, refresh window 60 s, jitter ≤ 12 s
    manager = make_manager(clock=clock, clock_check_interval=0.005)
    first = await manager.token()
    assert first.expires_at == pytest.approx(clock.now + 120, abs=1)
    clock.advance(first.expires_at - clock.now + 1)  # past expiry
    await asyncio.sleep(0.05)  # the wall-clock check retires the hot entry
    second = await manager.token()
    assert second.access_token != first.access_token
    assert second.expires_at > clock.now
    assert server.token_requests == 2
    header = await manager.header()
    assert header["Authorization"] == f"Bearer {second.access_token}"


async def test_a_token_inside_its_safety_margin_is_not_handed_out(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    import time

    clock = FakeClock(time.time())
    server.expires_in = 120
    manager = make_manager(clock=clock, clock_check_interval=0.005)
    first = await manager.token()
    clock.advance(120 - 29)  # 29 s left: inside the 30 s margin
    await asyncio.sleep(0.05)
    assert (await manager.token()) != first


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://auth.commercelayer.io/oauth/token", True),
        ("http://127.0.0.1:8080/oauth/token", True),
        ("http://127.5.6.7/oauth/token", True),
        ("http://[::1]:9000/oauth/token", True),
        ("http://localhost/oauth/token", True),
        ("http://auth.commercelayer.io/oauth/token", False),
        ("http://10.0.0.1/oauth/token", False),
        ("ftp://auth.commercelayer.io/", False),
        ("https://user:pw@auth.commercelayer.io/oauth/token", False),
        ("", False),
    ],
)
def test_auth_url_must_be_https_unless_loopback(url: str, ok: bool) -> None:
    if ok:
        TokenManager("id", "secret", auth_url=url)
    else:
        with pytest.raises(ConfigurationError, match="auth_url"):
            TokenManager("id", "secret", auth_url=url)


def test_bad_arguments_are_all_named_in_one_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        TokenManager(
            "",
            "s3cret-value",
            scope="",
            body_encoding="xml",  # type: ignore[arg-type]
            attempts=0,
            safety_margin=-1,
        )
    message = str(info.value)
    for name in ("client_id", "scope", "body_encoding", "attempts", "safety_margin"):
        assert name in message
    assert "s3cret-value" not in message


@pytest.mark.parametrize("scope", ["", "  padded ", 42, ["market:all"]])
async def test_a_bad_scope_argument_is_a_configuration_error(
    make_manager: MakeManager, scope: object
) -> None:
    manager = make_manager()
    with pytest.raises(ConfigurationError, match="scope"):
        await manager.header(scope)  # type: ignore[arg-type]


async def test_secrets_never_appear_in_repr(make_manager: MakeManager) -> None:
    manager = make_manager()
    token = await manager.token()
    assert SECRET not in repr(manager)
    assert token.access_token not in repr(token)
    assert token.access_token[-4:] in repr(token)


async def test_an_injected_session_is_used_and_left_open(server: FakeAuthServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with TokenManager(
            server.client_id, SECRET, auth_url=server.url, session=session
        ) as manager:
            await manager.header()
        assert not session.closed


def test_a_manager_moves_to_a_new_event_loop_after_the_old_one_finished() -> None:
    async def serve() -> FakeAuthServer:
        server = FakeAuthServer(client_secret=SECRET)
        await server.start()
        return server

    async def use(manager: TokenManager) -> str:
        return (await manager.header())["Authorization"]

    # The server needs one loop that outlives both uses, so it runs in its own thread.
    import threading

    ready = threading.Event()
    holder: dict[str, object] = {}

    def run_server() -> None:
        loop = asyncio.new_event_loop()
        holder["loop"] = loop
        holder["server"] = loop.run_until_complete(serve())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run_server, daemon=True)
    thread.start()
    ready.wait(5)
    server = holder["server"]
    assert isinstance(server, FakeAuthServer)
    manager = TokenManager(server.client_id, SECRET, auth_url=server.url)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        first = asyncio.run(use(manager))
        second = asyncio.run(use(manager))
        asyncio.run(manager.aclose())
        gc.collect()
    assert first == second
    assert server.token_requests == 1
    loop = holder["loop"]
    assert isinstance(loop, asyncio.AbstractEventLoop)
    asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


async def test_token_is_frozen_and_carries_claims(make_manager: MakeManager) -> None:
    manager = make_manager(scope="market:id:xYZkjABcde")
    token = await manager.token()
    assert isinstance(token, Token)
    with pytest.raises(AttributeError):
        token.access_token = "x"  # type: ignore[misc]
    assert token.token_type == "Bearer"
    assert token.scope == "market:id:xYZkjABcde"
    assert token.claims is not None
    assert token.claims.organization_slug == "fake-org"
    assert token.claims.market_ids == ("xYZkjABcde",)


async def test_encryption_key_is_a_keyword_argument(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from cryptography.fernet import Fernet

    directory = tmp_path / "tokens"
    key = Fernet.generate_key()
    async with FakeAuthServer() as server:
        manager = TokenManager(
            server.client_id,
            server.client_secret,
            auth_url=server.url,
            backend=f"file://{directory}",
            encryption_key=key,
        )
        token = await manager.token()
        await manager.aclose()
    stored = b"".join(p.read_bytes() for p in directory.iterdir() if p.suffix == ".json")
    assert stored
    assert token.access_token.encode() not in stored
    with pytest.raises(ConfigurationError, match="encryption_key"):
        TokenManager("c", "s", backend=MemoryBackend(), encryption_key=key)
    with pytest.raises(ConfigurationError, match="twice"):
        TokenManager(
            "c",
            "s",
            backend=f"file://{directory}",
            encryption_key=key,
            backend_options={"encryption_key": key},
        )


async def test_claims_are_a_read_only_mapping_over_the_payload(
    server: FakeAuthServer, make_manager: MakeManager
) -> None:
    claims = (await make_manager().token()).claims
    assert claims is not None
    assert claims["organization"]["slug"] == claims.organization_slug == "fake-org"
    assert "exp" in claims
    assert len(claims) == len(claims.payload)
    assert dict(claims) == claims.payload
    with pytest.raises(TypeError):
        claims["exp"] = 0  # type: ignore[index]


async def test_a_caller_resumed_after_its_token_expired_looks_again() -> None:
    # The loop stalls (a blocking call elsewhere in the app) between the flight's end and
    # this caller's resumption, for longer than the token lives: it must not be handed
    # the expired token.
    async with (
        FakeAuthServer(expires_in=2) as server,
        TokenManager(server.client_id, server.client_secret, auth_url=server.url) as manager,
    ):
        flight = manager._lookup(None)
        assert isinstance(flight, asyncio.Future)
        flight.add_done_callback(lambda _done: time.sleep(2.1))
        header = await manager.header()
    assert server.token_requests == 2
    assert header == {"Authorization": f"Bearer {server.issued[1]}"}
