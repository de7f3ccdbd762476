"""SyncTokenManager: the synchronous API for Django, Flask, Celery and scripts.

Every test uses real servers on threads of their own (the fake token server, and a tiny
http.server API for the 401 retries), as a synchronous application would reach them.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import re
import select
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import requests

from cl_tokens import (
    AuthenticationError,
    ConfigurationError,
    LoginRequiredError,
    Settings,
    SyncTokenManager,
    TokenError,
)
from cl_tokens.testing import FakeAuthServer

SECRET = "test-client-secret"


class ThreadedServer:
    """A FakeAuthServer on its own thread and event loop."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.server: FakeAuthServer

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = FakeAuthServer(client_secret=SECRET, **self._options)
        self.loop.run_until_complete(self.server.start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.aclose())
        self.loop.close()

    def __enter__(self) -> FakeAuthServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def auth_server() -> Iterator[FakeAuthServer]:
    with ThreadedServer() as server:
        yield server


@pytest.fixture
def manager(auth_server: FakeAuthServer) -> Iterator[SyncTokenManager]:
    with SyncTokenManager(auth_server.client_id, SECRET, auth_url=auth_server.url) as made:
        yield made


def _loop_thread(manager: SyncTokenManager) -> threading.Thread | None:
    runner = manager._state.runner
    return None if runner is None else runner._thread


# -- thread safety and the warm path ---------------------------------------------------


def test_64_threads_on_a_cold_cache_make_one_token_request() -> None:
    # The token server takes 0.3 s: every thread asks while the one request is out.
    with (
        ThreadedServer(latency=0.3) as server,
        SyncTokenManager(server.client_id, SECRET, auth_url=server.url) as manager,
    ):
        barrier = threading.Barrier(64)
        headers: list[dict[str, str]] = []
        errors: list[BaseException] = []

        def call() -> None:
            barrier.wait()
            try:
                headers.append(manager.header())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        assert len(headers) == 64
        assert server.token_requests == 1
        assert len({h["Authorization"] for h in headers}) == 1
        assert headers[0]["Authorization"] == f"Bearer {server.issued[0]}"


def test_the_loop_thread_starts_on_first_need_and_is_a_daemon(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    assert _loop_thread(manager) is None
    manager.header()
    thread = _loop_thread(manager)
    assert thread is not None
    assert thread.daemon
    assert thread.is_alive()


def test_a_warm_call_reads_the_hot_tier_without_a_thread_hop(
    manager: SyncTokenManager, auth_server: FakeAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = manager.header()
    token = manager.token()

    def no_hop(*args: object) -> Any:
        raise AssertionError("a warm call went to the event loop")

    monkeypatch.setattr(manager._state, "submit", no_hop)
    assert manager.header() == first
    assert manager.header() is not manager.header()  # a new dict each call
    assert manager.token() is token
    assert auth_server.token_requests == 1


def test_scopes_and_their_errors(manager: SyncTokenManager, auth_server: FakeAuthServer) -> None:
    europe = manager.token("market:code:europe")
    assert europe.scope == "market:code:europe"
    assert manager.header("market:code:europe") == {"Authorization": europe.authorization}
    assert manager.header() != manager.header("market:code:europe")
    with pytest.raises(ConfigurationError, match="scope"):
        manager.header(["not", "a", "scope"])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="scope"):
        manager.header(" padded ")


def test_rejected_credentials_raise_in_the_calling_thread(auth_server: FakeAuthServer) -> None:
    manager = SyncTokenManager(auth_server.client_id, "wrong", auth_url=auth_server.url)
    with manager, pytest.raises(AuthenticationError):
        manager.header()


def test_invalidate_drops_only_the_cached_token_and_the_next_call_fetches(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    old = manager.token()
    assert manager.invalidate("not-the-cached-token") is False
    assert manager.token() is old
    assert manager.invalidate(old.access_token) is True
    new = manager.token()
    assert new.access_token != old.access_token
    assert auth_server.token_requests == 2


def test_revoke_revokes_at_the_server(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    assert manager.revoke() is False  # nothing cached yet
    token = manager.token()
    assert manager.revoke() is True
    assert token.access_token in auth_server.revoked
    assert manager.token().access_token != token.access_token


# -- construction ----------------------------------------------------------------------


def test_from_env_and_from_settings(auth_server: FakeAuthServer) -> None:
    environ = {
        "CL_CLIENT_ID": auth_server.client_id,
        "CL_CLIENT_SECRET": SECRET,
        "CL_AUTH_URL": auth_server.url,
        "CL_SCOPE": "market:code:europe",
    }
    with SyncTokenManager.from_env(environ) as manager:
        assert manager.scope == "market:code:europe"
        assert manager.token().scope == "market:code:europe"
    settings = {"client_id": auth_server.client_id, "client_secret": SECRET}
    with SyncTokenManager.from_settings(settings, auth_url=auth_server.url, attempts=1) as manager:
        assert manager.tuning.attempts == 1
        assert manager.client_id == auth_server.client_id
        assert manager.auth_url == auth_server.url
        assert manager.header()["Authorization"].startswith("Bearer ")
    with SyncTokenManager.from_settings(Settings.from_env(environ)) as manager:
        assert manager.scope == "market:code:europe"


def _sync_loop_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "cl_tokens-sync-loop"}


def test_bad_arguments_are_configuration_errors_and_no_thread_starts() -> None:
    before = _sync_loop_threads()
    with pytest.raises(ConfigurationError, match="client_id"):
        SyncTokenManager("")
    with pytest.raises(ConfigurationError, match="attempts"):
        SyncTokenManager("id", "secret", attempts=0)
    with pytest.raises(ConfigurationError, match="session"):
        SyncTokenManager("id", "secret", session=object())
    assert _sync_loop_threads() <= before


def test_repr_names_no_secret() -> None:
    manager = SyncTokenManager("the-id", "the-very-secret", scope="market:all")
    try:
        assert "the-id" in repr(manager)
        assert "the-very-secret" not in repr(manager)
    finally:
        manager.close()


# -- close -----------------------------------------------------------------------------


def test_close_stops_the_thread_and_every_later_call_raises(
    auth_server: FakeAuthServer,
) -> None:
    manager = SyncTokenManager(auth_server.client_id, SECRET, auth_url=auth_server.url)
    token = manager.token()
    thread = _loop_thread(manager)
    assert thread is not None
    manager.close()
    assert not thread.is_alive()
    assert manager.closed
    with pytest.raises(TokenError, match="closed"):
        manager.header()  # the hot tier was emptied: no token after close
    with pytest.raises(TokenError, match="closed"):
        manager.token()
    with pytest.raises(TokenError, match="closed"):
        manager.invalidate(token.access_token)
    with pytest.raises(TokenError, match="closed"):
        manager.revoke()
    with pytest.raises(TokenError, match="closed"), manager:
        pass
    manager.close()  # idempotent
    assert _loop_thread(manager) is None


def test_close_of_an_unused_manager_closes_the_backend_it_built(tmp_path: Any) -> None:
    directory = tmp_path / "tokens"
    directory.mkdir(mode=0o700)
    before = _sync_loop_threads()
    manager = SyncTokenManager("id", "secret", backend=f"file://{directory}")
    closed: list[bool] = []

    async def aclose() -> None:
        closed.append(True)

    manager.backend.aclose = aclose  # type: ignore[method-assign]
    manager.close()
    assert manager.closed
    assert closed == [True]
    assert not {t for t in _sync_loop_threads() - before if t.is_alive()}


def test_close_while_a_call_waits_ends_the_call_with_token_error() -> None:
    with ThreadedServer() as server:
        manager = SyncTokenManager(server.client_id, SECRET, auth_url=server.url)
        server.delay_next(1, seconds=20)
        outcome: list[BaseException | dict[str, str]] = []

        def call() -> None:
            try:
                outcome.append(manager.header())
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 10
        while server.token_requests == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        manager.close()
        caller.join(10)
        assert not caller.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], TokenError)
        assert "closed" in str(outcome[0])


def test_a_manager_dropped_without_close_warns_and_its_thread_ends(
    auth_server: FakeAuthServer,
) -> None:
    manager = SyncTokenManager(auth_server.client_id, SECRET, auth_url=auth_server.url)
    manager.header()
    thread = _loop_thread(manager)
    assert thread is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del manager
        gc.collect()
        thread.join(10)
    assert not thread.is_alive()
    messages = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert any("unclosed SyncTokenManager" in m for m in messages), messages


def test_a_call_from_the_managers_own_loop_is_refused_not_deadlocked(
    manager: SyncTokenManager,
) -> None:
    manager.header()
    runner = manager._state.runner
    assert runner is not None

    async def inside() -> str:
        try:
            manager.invalidate("x")
        except TokenError as exc:
            return str(exc)
        return "no error"

    message = asyncio.run_coroutine_threadsafe(inside(), runner.loop).result(10)
    assert "own event loop" in message

    async def close_inside() -> str:
        try:
            manager.close()
        except TokenError as exc:
            return str(exc)
        return "no error"

    message = asyncio.run_coroutine_threadsafe(close_inside(), runner.loop).result(10)
    assert "own event loop" in message
    assert not manager.closed  # refused, not half-done: close() from here still works
    assert manager.header()["Authorization"].startswith("Bearer ")


# -- fork (Celery prefork, gunicorn) ---------------------------------------------------


def _jwt_exp(access_token: str) -> float:
    payload = access_token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return float(claims["exp"])


def _use_for(manager: SyncTokenManager, seconds: float) -> list[list[Any]]:
    """Call header() and token() for ``seconds``; record what was served and when."""
    seen: list[list[Any]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        at = time.time()
        value = manager.header()["Authorization"]
        token = manager.token()
        seen.append([at, value, token.access_token, token.expires_at, time.time()])
        time.sleep(0.02)
    return seen


def _check_served(seen: list[list[Any]], issued: list[str]) -> None:
    assert seen, "nothing was served"
    for at, value, access_token, expires_at, after in seen:
        bearer = value.removeprefix("Bearer ")
        assert bearer in issued
        # The server's exp claim (whole seconds, so never later than the real expiry).
        assert at < _jwt_exp(bearer), "an expired token was served"
        # expires_in 4 s: the safety margin is 1 s; no token is handed out inside it.
        assert after < expires_at - 1.0, "a token inside its safety margin was served"
        assert access_token in issued


@pytest.mark.slow
def test_prefork_children_and_their_parent_never_serve_an_expired_token() -> None:
    """Celery's prefork pool: the parent uses the manager (so its loop thread runs),
    then forks workers, which keep asking for longer than a token lives."""
    with ThreadedServer(expires_in=4) as server:
        manager = SyncTokenManager(server.client_id, SECRET, auth_url=server.url)
        inherited = manager.header()  # the parent's loop thread is running now
        assert _loop_thread(manager) is not None
        children: list[tuple[int, int]] = []
        for _ in range(3):
            read_end, write_end = os.pipe()
            with warnings.catch_warnings():  # 3.12+: "multi-threaded, fork() may deadlock"
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # a worker
                code = 1
                try:
                    os.close(read_end)
                    seen = _use_for(manager, 6.0)
                    fresh_thread = _loop_thread(manager)
                    alive = fresh_thread is not None and fresh_thread.is_alive()
                    manager.close()
                    stopped = fresh_thread is not None and not fresh_thread.is_alive()
                    os.write(write_end, json.dumps([seen, alive, stopped]).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(write_end)
            children.append((pid, read_end))
        try:
            parent_seen = _use_for(manager, 6.0)
            results = [_wait_child(pid, read_end) for pid, read_end in children]
        finally:
            _reap(pid for pid, _ in children)
            manager.close()
        issued = list(server.issued)
    _check_served(parent_seen, issued)
    assert inherited["Authorization"] in {v for _, v, *_ in parent_seen}
    for seen, alive, stopped in results:
        _check_served(seen, issued)
        assert alive, "the child served calls without a loop thread of its own"
        assert stopped, "close() in the child did not stop the child's thread"
        # It moved on to new tokens instead of keeping the inherited one.
        assert len({access_token for _, _, access_token, _, _ in seen}) >= 2


def _wait_child(pid: int, read_end: int, timeout: float = 60) -> Any:
    """The child's JSON report; a child that hangs is killed and the test fails."""
    deadline = time.monotonic() + timeout
    data = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:  # read first: it may fill the pipe
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([pipe], [], [], max(left, 0))
            if not ready:
                pytest.fail(f"the child did not finish within {timeout:g} s (a deadlock?)")
            chunk = pipe.read(65536)
            if not chunk:
                break
            data += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data[-2000:]
    return json.loads(data)


def _reap(pids: Iterable[int]) -> None:
    """Kill and wait for children still running (after a failure: never leave them)."""
    for pid in pids:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# -- requests_auth() and httpx_auth() against a real API server ------------------------


class TinyApi:
    """A Commerce-Layer-like API on http.server: 401 INVALID_TOKEN for refused tokens.

    ``refuse_first``: refuse the first token it sees, accept every other one;
    ``refuse_all``: refuse every token. Records each request's token and body.
    """

    def __init__(self, *, refuse_first: bool = False, refuse_all: bool = False) -> None:
        self.seen: list[tuple[str | None, bytes]] = []
        self.refused: set[str] = set()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Transfer-Encoding") == "chunked":
                    body = _read_chunked(self.rfile)
                else:
                    body = self.rfile.read(length)
                auth = self.headers.get("Authorization")
                api.seen.append((auth, body))
                if auth is not None and refuse_first and not api.refused:
                    api.refused.add(auth)
                if auth is None or refuse_all or auth in api.refused:
                    status = 401
                    payload: dict[str, Any] = {
                        "errors": [{"code": "INVALID_TOKEN", "title": "Invalid token"}]
                    }
                else:
                    status, payload = 200, {"data": []}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.api+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> TinyApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _read_chunked(rfile: Any) -> bytes:
    body = b""
    while True:
        size = int(rfile.readline().strip(), 16)
        if size == 0:
            rfile.readline()
            return body
        body += rfile.read(size)
        rfile.readline()


def test_requests_auth_retries_once_on_401_with_a_fresh_token(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    stale = manager.token()
    with TinyApi(refuse_first=True) as api, requests.Session() as session:
        session.auth = manager.requests_auth(hosts=["127.0.0.1"])
        response = session.post(f"{api.url}/api/orders", json={"n": 1}, timeout=10)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    (first_auth, first_body), (second_auth, second_body) = api.seen
    assert first_auth == stale.authorization
    fresh = manager.token()
    assert second_auth == fresh.authorization
    assert fresh.access_token != stale.access_token
    assert first_body == second_body == b'{"n": 1}'
    assert auth_server.token_requests == 2
    assert response.request.headers["Authorization"] == fresh.authorization


def test_requests_auth_returns_a_second_401_without_a_third_request(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    with TinyApi(refuse_all=True) as api:
        response = requests.get(
            f"{api.url}/api/skus", auth=manager.requests_auth(hosts=["127.0.0.1"]), timeout=10
        )
    assert response.status_code == 401
    assert len(api.seen) == 2
    assert auth_server.token_requests == 2


def test_requests_auth_does_not_retry_a_streamed_body_but_drops_its_token(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    stale = manager.token()
    with TinyApi(refuse_first=True) as api:
        response = requests.post(
            f"{api.url}/api/imports",
            data=iter([b"chunk-1", b"chunk-2"]),
            auth=manager.requests_auth(hosts=["127.0.0.1"]),
            timeout=10,
        )
    assert response.status_code == 401
    assert len(api.seen) == 1
    assert manager.token().access_token != stale.access_token  # the caller's retry works


def test_requests_auth_keeps_the_token_from_other_hosts_and_explicit_headers(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    auth = manager.requests_auth()  # no extra hosts: 127.0.0.1:<api port> is not allowed
    with TinyApi() as api:
        refused = requests.get(f"{api.url}/api/skus", auth=auth, timeout=10)
        own = requests.get(
            f"{api.url}/api/skus",
            auth=manager.requests_auth(hosts=["127.0.0.1"]),
            headers={"Authorization": "Bearer mine"},
            timeout=10,
        )
    assert refused.status_code == 401
    assert own.status_code == 200
    assert [auth for auth, _ in api.seen] == [None, "Bearer mine"]
    assert auth_server.token_requests == 0  # no token was even fetched


def test_requests_auth_against_the_fake_servers_own_api(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    """The auth_url's origin may receive the token: the fake server's /api acts as
    Commerce Layer's, refusing a token the server expired."""
    stale = manager.token()
    auth_server.expire(stale.access_token)
    response = requests.get(f"{auth_server.api_url}/skus", auth=manager.requests_auth(), timeout=10)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert auth_server.api_requests == 2


def test_httpx_auth_retries_once_on_401_with_a_fresh_token(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    stale = manager.token()
    with (
        TinyApi(refuse_first=True) as api,
        httpx.Client(auth=manager.httpx_auth(hosts=["127.0.0.1"])) as client,
    ):
        response = client.post(f"{api.url}/api/orders", json={"n": 1})
        again = client.get(f"{api.url}/api/orders")
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    fresh = manager.token()
    assert [auth for auth, _ in api.seen] == [
        stale.authorization,
        fresh.authorization,
        fresh.authorization,
    ]
    assert api.seen[0][1] == api.seen[1][1]
    assert again.status_code == 200
    assert auth_server.token_requests == 2


def test_httpx_auth_returns_a_second_401_and_refuses_the_async_client(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    with (
        TinyApi(refuse_all=True) as api,
        httpx.Client(auth=manager.httpx_auth(hosts=["127.0.0.1"])) as client,
    ):
        response = client.get(f"{api.url}/api/skus")
    assert response.status_code == 401
    assert len(api.seen) == 2

    async def use_async() -> None:
        async with httpx.AsyncClient(auth=manager.httpx_auth()) as client:
            await client.get(f"{auth_server.api_url}/skus")

    with pytest.raises(ConfigurationError, match=r"httpx\.Client only"):
        asyncio.run(use_async())


def test_auth_hosts_must_be_host_names(manager: SyncTokenManager) -> None:
    with pytest.raises(ConfigurationError, match="host"):
        manager.requests_auth(hosts="api.example.com")
    with pytest.raises(ConfigurationError, match="host"):
        manager.httpx_auth(hosts=["https://api.example.com"])


def test_requests_auth_without_requests_names_the_install_command(
    manager: SyncTokenManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "requests", None)
    monkeypatch.delitem(sys.modules, "cl_tokens._requests_auth", raising=False)
    with pytest.raises(ImportError, match=re.escape("pip install 'cl-tokens[requests]'")):
        manager.requests_auth()
    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.delitem(sys.modules, "cl_tokens._httpx_sync_auth", raising=False)
    with pytest.raises(ImportError, match=re.escape("pip install 'cl-tokens[httpx]'")):
        manager.httpx_auth()


def test_32_threads_refused_the_same_stale_token_cause_one_new_token_request(
    manager: SyncTokenManager, auth_server: FakeAuthServer
) -> None:
    stale = manager.token()
    auth = manager.requests_auth(hosts=["127.0.0.1"])
    barrier = threading.Barrier(32)
    statuses: list[int] = []
    with TinyApi(refuse_first=True) as api:
        api.refused.add(stale.authorization)  # the API refuses it from the start

        def call() -> None:
            barrier.wait()
            with requests.Session() as session:
                statuses.append(
                    session.get(f"{api.url}/api/skus", auth=auth, timeout=30).status_code
                )

        threads = [threading.Thread(target=call) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert statuses == [200] * 32
    assert auth_server.token_requests == 2  # the first token, and one replacement
    fresh = manager.token()
    assert {a for a, _ in api.seen} == {stale.authorization, fresh.authorization}


# -- customers -------------------------------------------------------------------------


def test_customer_login_warm_header_401_renewal_and_logout(
    manager: SyncTokenManager, auth_server: FakeAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = auth_server.customers.add("ann@example.com", "pw-123456")
    token = manager.login("ann@example.com", "pw-123456")
    assert token.owner_id == owner
    header = manager.header(customer=owner)
    assert header == {"Authorization": token.authorization}
    assert manager.header() != header  # the app's own token is another key

    with monkeypatch.context() as patched:  # warm: served in this thread
        patched.setattr(manager._state, "submit", _no_hop)
        assert manager.header(customer=owner) == header
        assert manager.token(customer=owner) is token

    auth_server.expire(token.access_token)  # the API refuses it from now on
    response = requests.get(
        f"{auth_server.api_url}/orders", auth=manager.requests_auth(customer=owner), timeout=10
    )
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    renewed = manager.token(customer=owner)
    assert renewed.access_token != token.access_token
    assert auth_server.customers.refresh_requests == 1  # renewed with the refresh token

    assert manager.logout(owner) is True
    with pytest.raises(LoginRequiredError):
        manager.header(customer=owner)


def _no_hop(*args: object) -> Any:
    raise AssertionError("a warm call went to the event loop")
