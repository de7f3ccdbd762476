"""The fake server's customer grants: password, refresh_token, JWT bearer, authorization code.

Refresh tokens are single-use, as Commerce Layer's rotate: a reused one is answered
``401 invalid_grant`` and counted in ``refresh_reuses``, so a test can prove that a fleet
never sends one twice.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from ._fake_server import FakeAuthServer, RecordedRequest

__all__ = ["FakeCustomers"]

_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_CLAIMS = "https://commercelayer.io/claims"
_REFRESH_LIFETIME = 14 * 24 * 3600


def _invalid_grant(detail: str) -> web.Response:
    error = {"code": "UNAUTHORIZED", "title": "invalid_grant", "detail": detail, "status": 401}
    return web.json_response({"errors": [error]}, status=401)


@dataclass
class FakeCustomers:
    """Customers, their refresh tokens and authorization codes, for ``FakeAuthServer``.

    Attributes:
        expires_in: the lifetime of customer access tokens (seconds).
        refresh_requests: refresh_token grants received.
        refresh_reuses: refresh_token grants that sent an already-used refresh token.
    """

    expires_in: float = 7200
    refresh_requests: int = 0
    refresh_reuses: int = 0
    _passwords: dict[str, tuple[str, str]] = field(default_factory=dict)  # user: (pw, id)
    _refresh: dict[str, tuple[str, str, bool]] = field(
        default_factory=dict
    )  # tok: (id, scope, used)
    _codes: dict[str, tuple[str, str]] = field(default_factory=dict)  # code: (id, redirect)

    def add(self, username: str, password: str, owner_id: str | None = None) -> str:
        owner_id = owner_id or "cust" + secrets.token_hex(4)
        self._passwords[username] = (password, owner_id)
        return owner_id

    def issue_code(self, owner_id: str, redirect_uri: str) -> str:
        code = secrets.token_urlsafe(16)
        self._codes[code] = (owner_id, redirect_uri)
        return code

    def revoke(self, token: str) -> None:
        if token in self._refresh:
            owner, scope, _ = self._refresh[token]
            self._refresh[token] = (owner, scope, True)

    def answer(self, server: FakeAuthServer, recorded: RecordedRequest) -> web.Response:
        body = recorded.body
        if body.get("client_id") != server.client_id:
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "status": 401}]}, status=401
            )
        grant = body.get("grant_type")
        scope = body.get("scope") or None
        if grant == "password":
            known = self._passwords.get(body.get("username", ""))
            if known is None or known[0] != body.get("password"):
                return _invalid_grant("invalid username or password")
            return self._issue(server, known[1], scope)
        if grant == "refresh_token":
            self.refresh_requests += 1
            held = self._refresh.get(body.get("refresh_token", ""))
            if held is None:
                return _invalid_grant("unknown refresh token")
            owner, granted, used = held
            if used:
                self.refresh_reuses += 1
                return _invalid_grant("refresh token already used")
            self._refresh[body["refresh_token"]] = (owner, granted, True)
            return self._issue(server, owner, scope or granted)
        needs_secret = body.get("client_secret") != server.client_secret
        if grant == _JWT_BEARER:
            asserted = _assertion_owner(body.get("assertion", ""))
            if needs_secret or asserted is None:
                return _invalid_grant("invalid assertion or client")
            return self._issue(server, asserted[0], scope, asserted[1])
        if grant == "authorization_code":
            held_code = self._codes.pop(body.get("code", ""), None)
            if needs_secret or held_code is None or held_code[1] != body.get("redirect_uri"):
                return _invalid_grant("invalid authorization code")
            return self._issue(server, held_code[0], scope)
        return web.json_response(
            {"errors": [{"code": "BAD_REQUEST", "title": "unsupported_grant_type", "status": 400}]},
            status=400,
        )

    def _issue(
        self, server: FakeAuthServer, owner_id: str, scope: str | None, kind: str = "Customer"
    ) -> web.Response:
        now = time.time()
        access = server.customer_jwt(scope, now, self.expires_in, owner_id, kind)
        refresh = secrets.token_urlsafe(24)
        self._refresh[refresh] = (owner_id, scope or "", False)
        server.issued.append(access)
        return web.json_response(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "scope": scope or "market:all",
                "created_at": int(now),
                "refresh_token": refresh,
                "owner_id": owner_id,
                "owner_type": kind.lower() if kind == "Customer" else kind,
            }
        )


def _assertion_owner(assertion: str) -> tuple[str, str] | None:
    """(owner id, owner type) of a js-auth format assertion, or None when malformed."""
    parts = assertion.split(".")
    if len(parts) != 3 or len(assertion) > 4096:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        payload: Any = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS512":
        return None
    owner = payload.get(_CLAIMS, {}).get("owner") if isinstance(payload, dict) else None
    if not isinstance(owner, dict) or not isinstance(owner.get("id"), str):
        return None
    return owner["id"], str(owner.get("type") or "Customer")
