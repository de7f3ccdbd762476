"""OAuth2 grants: each builds its request body; the endpoint and the manager do the rest.

Commerce Layer takes every grant at the same token endpoint, with a JSON body:
``client_credentials`` (the app's own token), ``password`` (a customer logs in),
``refresh_token`` (a customer's token renewed; the answer carries a new refresh token),
the JWT bearer grant (act for a customer authenticated elsewhere) and
``authorization_code`` (webapps).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigurationError

__all__ = [
    "CLIENT_CREDENTIALS",
    "JWT_BEARER",
    "MAX_ASSERTION_BYTES",
    "Grant",
    "authorization_code",
    "client_credentials",
    "create_assertion",
    "jwt_bearer",
    "password",
    "refresh_token",
]

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_ASSERTION_BYTES = 4096
_CLAIMS = "https://commercelayer.io/claims"


@dataclass(frozen=True)
class Grant:
    """One grant's request: its type, its own fields (hidden from ``repr``), and
    whether a failed attempt may be sent again.

    Attributes:
        grant_type: the OAuth2 ``grant_type``.
        fields: the grant's own body fields (username, password, refresh_token...).
        retryable: False for a refresh token, which is single-use: a request that may
            have reached the server is never sent a second time.
        needs_secret: the grant requires the client secret (JWT bearer).
    """

    grant_type: str
    fields: Mapping[str, str] = field(default_factory=dict, repr=False)
    retryable: bool = True
    needs_secret: bool = False

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values to keep out of every message (an echo of them is redacted)."""
        return tuple(v for k, v in self.fields.items() if k != "redirect_uri")

    @property
    def label(self) -> str:
        """A short name for logs and metrics."""
        return "jwt_bearer" if self.grant_type == JWT_BEARER else self.grant_type

    def body(self, client_id: str, client_secret: str | None, scope: str | None) -> dict[str, str]:
        """The JSON body Commerce Layer documents for this grant."""
        if self.needs_secret and client_secret is None:
            raise ConfigurationError(f"the {self.label} grant needs a client secret")
        body = {"grant_type": self.grant_type, "client_id": client_id, **self.fields}
        if client_secret is not None:
            body["client_secret"] = client_secret
        if scope is not None:
            body["scope"] = scope
        return body


CLIENT_CREDENTIALS = Grant("client_credentials")


def client_credentials() -> Grant:
    return CLIENT_CREDENTIALS


def _text(name: str, value: object, limit: int = 1024) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ConfigurationError(f"{name} must be a non-empty string of at most {limit} characters")
    return value


def password(username: str, password: str) -> Grant:
    """A customer logs in with username (email) and password."""
    return Grant(
        "password",
        {"username": _text("username", username), "password": _text("password", password)},
    )


def refresh_token(token: str) -> Grant:
    """Renew a customer's token; never retried (the refresh token is single-use)."""
    return Grant("refresh_token", {"refresh_token": _text("refresh_token", token, 4096)}, False)


def jwt_bearer(assertion: str) -> Grant:
    """Act for a customer through an assertion (``create_assertion``) of at most 4 KB."""
    if not isinstance(assertion, str) or len(assertion.encode()) > MAX_ASSERTION_BYTES:
        raise ConfigurationError(
            f"the assertion must be a string of at most {MAX_ASSERTION_BYTES} bytes"
        )
    return Grant(
        JWT_BEARER,
        {"assertion": _text("assertion", assertion, MAX_ASSERTION_BYTES)},
        needs_secret=True,
    )


def authorization_code(code: str, redirect_uri: str) -> Grant:
    """Exchange an authorization code (webapps)."""
    return Grant(
        "authorization_code",
        {"code": _text("code", code), "redirect_uri": _text("redirect_uri", redirect_uri)},
        needs_secret=True,
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def create_assertion(
    *, owner_id: str, owner_type: str = "Customer", claims: Mapping[str, Any] | None = None
) -> str:
    """A JWT assertion for the JWT bearer grant, as Commerce Layer's js-auth makes it.

    HS512-signed with js-auth's fixed key ``"cl"`` (the assertion is authenticated by the
    client secret sent with it, not by this signature), with the owner and any custom
    claims under ``https://commercelayer.io/claims``.

    Args:
        owner_id: the customer's (or user's) id.
        owner_type: ``"Customer"`` or ``"User"``.
        claims: extra key/value pairs to enrich the token with (``custom_claim``).

    Raises:
        ConfigurationError: an argument is invalid, or the assertion exceeds 4 KB.
    """
    _text("owner_id", owner_id, 256)
    if owner_type not in ("Customer", "User"):
        raise ConfigurationError("owner_type must be 'Customer' or 'User'")
    body: dict[str, Any] = {"owner": {"type": owner_type, "id": owner_id}}
    if claims:
        body["custom_claim"] = dict(claims)
    payload = {_CLAIMS: body, "iat": int(time.time())}
    header = {"alg": "HS512", "typ": "JWT"}
    try:
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(payload, separators=(",", ":")).encode())
        )
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"claims must be JSON-serialisable: {type(exc).__name__}"
        ) from None
    signature = hmac.new(b"cl", signing_input.encode(), hashlib.sha512).digest()
    assertion = signing_input + "." + _b64url(signature)
    if len(assertion) > MAX_ASSERTION_BYTES:
        raise ConfigurationError(f"the assertion is longer than {MAX_ASSERTION_BYTES} bytes")
    return assertion
