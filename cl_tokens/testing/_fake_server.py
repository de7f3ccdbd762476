"""A real local token server that speaks like Commerce Layer's, for tests and demos."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl

from aiohttp import web

from ._fake_customers import FakeCustomers

__all__ = ["FakeAuthServer", "RecordedRequest"]

MalformedKind = Literal[
    "not-json", "html", "not-object", "no-access-token", "negative-expires-in", "empty"
]

_UNAUTHORIZED = {
    "code": "UNAUTHORIZED",
    "title": "invalid_client",
    "detail": "Client authentication failed due to unknown client, no client authentication "
    "included, or unsupported authentication method.",
    "status": 401,
}
_INVALID_TOKEN = {
    "code": "INVALID_TOKEN",
    "title": "Invalid token",
    "detail": "The access token you provided is invalid.",
    "status": 401,
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    path: str
    content_type: str
    body: dict[str, Any]
    raw: bytes = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    received_at: float


@dataclass
class _Fault:
    kind: Literal["status", "malformed", "delay", "reset"]
    status: int = 503
    retry_after: str | None = None
    body: str | None = None
    content_type: str | None = None
    seconds: float = 0.0
    malformed: MalformedKind = "not-json"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class FakeAuthServer:
    """An aiohttp.web server on 127.0.0.1 (a free port) with Commerce Layer's token API.

    ``POST /oauth/token`` answers like ``auth.commercelayer.io``: JWT-shaped tokens with
    ``organization``, ``application``, ``market``, ``exp`` and ``iss`` claims, and its
    error shapes. ``POST /oauth/revoke`` revokes a token. ``/api/...`` acts as a
    Commerce Layer API: 200 for a live token, 401 ``INVALID_TOKEN`` otherwise.

    Args:
        client_id: the client id it accepts.
        client_secret: the secret it accepts; None for sales-channel credentials.
        expires_in: lifetime in seconds of the tokens it issues.
        latency: seconds to wait before answering each token request.
        body_encoding: ``"json"``, ``"form"`` (rejects JSON like RFC 6749 servers do)
            or ``"any"``.
        organization_slug: the ``organization.slug`` claim.
        application_kind: the ``application.kind`` claim (integration, sales_channel...).
        reissue_window: None to issue a new token on every request; a number of seconds
            to behave like Commerce Layer, which returns the same token until only that
            much of its life is left (900 s there).
        port: 0 for a free port.
        issuer: the ``iss`` claim of the tokens it issues; None for its own base URL.

    Use ``async with FakeAuthServer() as server:`` and point a manager at ``server.url``.
    """

    def __init__(
        self,
        *,
        client_id: str = "test-client-id",
        client_secret: str | None = "test-client-secret",
        expires_in: float = 7200,
        latency: float = 0.0,
        body_encoding: Literal["json", "form", "any"] = "any",
        organization_slug: str = "fake-org",
        application_kind: str = "integration",
        reissue_window: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        issuer: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.latency = latency
        self.body_encoding = body_encoding
        self.organization_slug = organization_slug
        self.application_kind = application_kind
        self.reissue_window = reissue_window
        self._host = host
        self._port = port
        self.issuer = issuer
        self.requests: list[RecordedRequest] = []
        self.token_requests = 0
        self.api_requests = 0
        self.revoke_requests = 0
        self.issued: list[str] = []
        #: Customers for the password, refresh_token, JWT bearer and code grants:
        #: ``server.customers.add(username, password) -> owner_id``,
        #: ``server.customers.issue_code(owner_id, redirect_uri)``; single-use refresh
        #: tokens, with ``refresh_requests`` and ``refresh_reuses`` counted.
        self.customers = FakeCustomers()
        self.revoked: set[str] = set()
        self._expiry: dict[str, float] = {}
        self._current: dict[tuple[str, str | None], str] = {}
        self._faults: deque[_Fault] = deque()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The token endpoint: ``http://127.0.0.1:<port>/oauth/token``."""
        return f"{self.base_url}/oauth/token"

    @property
    def api_url(self) -> str:
        """The base of the fake Commerce Layer API: ``http://127.0.0.1:<port>/api``."""
        return f"{self.base_url}/api"

    async def start(self) -> FakeAuthServer:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_post("/oauth/revoke", self._revoke)
        app.router.add_route("*", "/api/{tail:.*}", self._api)
        # Held requests (delay_next) must not hold up the shutdown of a test.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, backlog=4096)
        await site.start()
        server = site._server
        assert server is not None
        assert isinstance(server, asyncio.base_events.Server)
        port = server.sockets[0].getsockname()[1]
        self.base_url = f"http://{self._host}:{port}"
        return self

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeAuthServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- fault injection ---------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        *,
        retry_after: float | str | None = None,
        body: str | None = None,
        content_type: str | None = None,
    ) -> None:
        """Answer the next ``n`` token requests with ``status`` (and ``Retry-After``).

        Without ``body``, the body is Commerce Layer's JSON error shape for the status.
        """
        after = None if retry_after is None else str(retry_after)
        for _ in range(n):
            self._faults.append(_Fault("status", status, after, body, content_type))

    def malformed_next(self, n: int = 1, kind: MalformedKind = "not-json") -> None:
        """Answer the next ``n`` token requests with a broken HTTP 200."""
        for _ in range(n):
            self._faults.append(_Fault("malformed", 200, malformed=kind))

    def delay_next(self, n: int = 1, seconds: float = 5.0) -> None:
        """Hold the next ``n`` token requests for ``seconds`` before answering."""
        for _ in range(n):
            self._faults.append(_Fault("delay", seconds=seconds))

    def reset_next(self, n: int = 1) -> None:
        """Drop the connection of the next ``n`` token requests without answering."""
        for _ in range(n):
            self._faults.append(_Fault("reset"))

    def clear_faults(self) -> None:
        self._faults.clear()

    def expire(self, access_token: str) -> None:
        """Make the API treat ``access_token`` as expired from now on."""
        self._expiry[access_token] = 0.0

    def is_live(self, access_token: str) -> bool:
        """Whether the fake API accepts ``access_token``: issued, unrevoked, unexpired."""
        return (
            access_token not in self.revoked and self._expiry.get(access_token, 0.0) > time.time()
        )

    # -- handlers ----------------------------------------------------------------------

    async def _record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        body: dict[str, Any] = {}
        if request.content_type == "application/json":
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            body = parsed if isinstance(parsed, dict) else {}
        elif request.content_type == "application/x-www-form-urlencoded":
            body = dict(parse_qsl(raw.decode(errors="replace")))
        recorded = RecordedRequest(
            path=request.path,
            content_type=request.content_type,
            body=body,
            raw=raw,
            headers=dict(request.headers),
            received_at=time.time(),
        )
        self.requests.append(recorded)
        return recorded

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_requests += 1
        recorded = await self._record(request)
        fault = self._faults.popleft() if self._faults else None
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault is not None:
            if fault.kind == "reset":
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError  # nothing more to say on a dropped connection
            if fault.kind == "delay":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "status":
                return self._fault_response(fault)
            else:
                return self._malformed(fault.malformed)
        if recorded.body.get("grant_type") not in (None, "client_credentials"):
            return self.customers.answer(self, recorded)
        rejection = self._check(recorded)
        if rejection is not None:
            return rejection
        scope = recorded.body.get("scope") or None
        return web.json_response(self._issue(scope))

    def _check(self, recorded: RecordedRequest) -> web.Response | None:
        form = recorded.content_type == "application/x-www-form-urlencoded"
        if self.body_encoding == "form" and not form:
            return web.json_response(
                {"error": "invalid_request", "error_description": "only form bodies are accepted"},
                status=400,
            )
        if self.body_encoding == "json" and recorded.content_type != "application/json":
            return _cl_error(400, "BAD_REQUEST", "invalid_request", "JSON body expected")
        body = recorded.body
        if body.get("grant_type") != "client_credentials":
            return _cl_error(
                400,
                "BAD_REQUEST",
                "unsupported_grant_type",
                "grant_type must be client_credentials",
            )
        if (
            body.get("client_id") != self.client_id
            or body.get("client_secret") != self.client_secret
        ):
            return web.json_response({"errors": [_UNAUTHORIZED]}, status=401)
        return None

    def _issue(self, scope: str | None) -> dict[str, Any]:
        now = time.time()
        current = self._current.get((self.client_id, scope))
        if current is not None and self.reissue_window is not None:
            left = self._expiry.get(current, 0.0) - now
            if left > self.reissue_window and current not in self.revoked:
                return self._answer(current, scope, left, now)
        access_token = self._jwt(scope, now)
        self._expiry[access_token] = now + self.expires_in
        self._current[(self.client_id, scope)] = access_token
        self.issued.append(access_token)
        return self._answer(access_token, scope, self.expires_in, now)

    def _answer(
        self, access_token: str, scope: str | None, left: float, now: float
    ) -> dict[str, Any]:
        return {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": int(left) if left >= 1 else left,
            "scope": scope or "market:all",
            "created_at": int(now),
        }

    def customer_jwt(
        self, scope: str | None, now: float, expires_in: float, owner_id: str, kind: str
    ) -> str:
        """An access token for a customer (or user), with the owner in its claims."""
        token = self._jwt(scope, now, {"owner": {"id": owner_id, "type": kind}}, expires_in)
        self._expiry[token] = now + expires_in
        return token

    def _jwt(
        self,
        scope: str | None,
        now: float,
        extra: dict[str, Any] | None = None,
        expires_in: float | None = None,
    ) -> str:
        header = {"alg": "RS512", "typ": "JWT", "kid": "fake-key"}
        claims: dict[str, Any] = {
            "organization": {"id": "fakeOrgId", "slug": self.organization_slug},
            "application": {
                "id": "fakeAppId",
                "client_id": self.client_id,
                "kind": self.application_kind,
                "public": self.client_secret is None,
            },
            "scope": scope or "market:all",
            "exp": int(now + (self.expires_in if expires_in is None else expires_in)),
            "iat": int(now),
            "iss": self.base_url if self.issuer is None else self.issuer,
            "test": True,
            "rand": secrets.token_hex(8),
        }
        claims.update(extra or {})
        if scope and scope.startswith("market:"):
            claims["market"] = {"id": [scope.rsplit(":", 1)[-1]], "price_list_id": None}
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        return signing_input + "." + _b64(secrets.token_bytes(64))

    def _fault_response(self, fault: _Fault) -> web.Response:
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if fault.body is not None:
            return web.Response(
                status=fault.status,
                text=fault.body,
                content_type=fault.content_type or "text/plain",
                headers=headers,
            )
        reason = web.Response(status=fault.status).reason
        code = "TOO_MANY_REQUESTS" if fault.status == 429 else reason.upper().replace(" ", "_")
        return web.json_response(
            {"errors": [{"code": code, "title": reason, "detail": reason, "status": fault.status}]},
            status=fault.status,
            headers=headers,
        )

    def _malformed(self, kind: MalformedKind) -> web.Response:
        if kind == "html":
            return web.Response(text="<html><body>Oops</body></html>", content_type="text/html")
        if kind == "not-json":
            return web.Response(text="{not json", content_type="application/json")
        if kind == "empty":
            return web.Response(text="", content_type="application/json")
        if kind == "not-object":
            return web.json_response(["access_token"])
        if kind == "no-access-token":
            return web.json_response({"token_type": "Bearer", "expires_in": 7200})
        return web.json_response(
            {"access_token": self._jwt(None, time.time()), "token_type": "Bearer", "expires_in": -5}
        )

    async def _revoke(self, request: web.Request) -> web.Response:
        self.revoke_requests += 1
        recorded = await self._record(request)
        body = recorded.body
        if (
            body.get("client_id") != self.client_id
            or body.get("client_secret") != self.client_secret
        ):
            return web.json_response({"errors": [_UNAUTHORIZED]}, status=401)
        token = body.get("token")
        if isinstance(token, str):
            self.revoked.add(token)
            self.customers.revoke(token)
        return web.json_response({})

    async def _api(self, request: web.Request) -> web.Response:
        self.api_requests += 1
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if not token or not self.is_live(token):
            return web.json_response({"errors": [_INVALID_TOKEN]}, status=401)
        return web.json_response({"data": [], "meta": {"path": request.path}})


def _cl_error(status: int, code: str, title: str, detail: str) -> web.Response:
    return web.json_response(
        {"errors": [{"code": code, "title": title, "detail": detail, "status": status}]},
        status=status,
    )
